"""The command line: ``datastore [--path PATH] [--timeout SECONDS] COMMAND ...``.

``export`` and ``import`` move a store's content in and out as JSON Lines,
one key a line: ``{"key": ..., "value": {...}, "expires_at": ...}``, where
``expires_at`` is the Unix time (``time.time()``) the key expires at, or
null. An absolute time, not a ttl, so that a file read days later restores
the keys that are still live, with the expiries they had.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import stat
import sys
import tempfile
import time
from typing import Any, BinaryIO, Iterator, Optional

from .codec import _encode_key, _encode_value, _expiry
from .errors import (
    DataStoreError, DataStoreValueError, InvalidTTLError, InvalidValueError, KeyExistsError,
    KeyNotFoundError,
)
from .store import DataStore
from . import __version__

_EXPORT_FIELDS = ("key", "value", "expires_at")  # each line of an export, in this order


def main(argv: Optional[list[str]] = None) -> int:
    """``python datastore.py [--path PATH] [--timeout SECONDS] COMMAND ...``.

    Returns the exit status: 0 on success, 1 on an error (one line on
    stderr), 2 on a usage error (from argparse).
    """
    parser = argparse.ArgumentParser(
        prog="datastore", description="Use a store from the command line.")
    parser.add_argument("--version", action="version", version=f"datastore {__version__}")
    parser.add_argument("--path", help="the store (default: $DATASTORE_PATH, or the "
                        "default store in your data folder)")
    parser.add_argument("--timeout", type=float, default=0, metavar="SECONDS",
                        help="wait this long for another process to close the store")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, does in (("create", "create KEY, which must not be live"),
                       ("set", "store KEY, live or not")):
        write = commands.add_parser(name, help=does)
        write.add_argument("key")
        write.add_argument("json", help='a JSON object, e.g. \'{"a": 1}\', or - to '
                           "read it from standard input")
        write.add_argument("--ttl", type=int, metavar="SECONDS",
                           help="delete the key after this many seconds")
    commands.add_parser("read", help="print KEY's JSON object").add_argument("key")
    commands.add_parser("delete", help="delete KEY").add_argument("key")
    commands.add_parser("ttl", help="print KEY's seconds to live (null: no ttl)"
                        ).add_argument("key")
    commands.add_parser("check", help="read every record; print a report, or fail "
                        "if any is damaged")
    keys_parser = commands.add_parser("keys", help="print the live keys, sorted, one a line")
    keys_parser.add_argument("--json", action="store_true",
                             help="print a JSON array instead (keys may hold newlines)")
    export_parser = commands.add_parser(
        "export", help="write every live key as JSON Lines, sorted by key")
    export_parser.add_argument("file", nargs="?", default="-", metavar="FILE",
                               help="the file to write, replaced whole at the end "
                               "(default: -, standard output)")
    import_parser = commands.add_parser(
        "import", help="create the keys of a file that export wrote; nothing if a "
        "line is bad")
    import_parser.add_argument("file", nargs="?", default="-", metavar="FILE",
                               help="the file to read (default: -, standard input)")
    import_parser.add_argument("--replace", action="store_true",
                               help="overwrite live keys (as set does) instead of failing")
    args = parser.parse_args(argv)
    try:
        if args.command in ("create", "set"):
            text = _read_stdin() if args.json == "-" else args.json
            try:
                value = json.loads(text)  # bytes from stdin: UTF-8 (or -16, -32) only
            except (ValueError, RecursionError) as exc:
                raise InvalidValueError(f"JSON for {args.key!r} is not valid: {exc}",
                                        key=args.key) from None
        elif args.command == "import":  # read and check it all before locking the store
            entries = _parse_export(_read_input(args.file), time.time())
        with _opened(args.path, args.timeout) as store:
            if args.command == "create":
                store.create(args.key, value, ttl=args.ttl)
            elif args.command == "set":
                store.set(args.key, value, ttl=args.ttl)
            elif args.command == "read":
                output = json.dumps(store.read(args.key), ensure_ascii=False)
            elif args.command == "delete":
                store.delete(args.key)
            elif args.command == "ttl":
                output = json.dumps(store.ttl(args.key))
            elif args.command == "check":
                output = json.dumps(store.check())
            elif args.command == "export":
                _export(store, args.file)
            elif args.command == "import":
                output = _import(store, entries, args.replace)
            elif args.json:
                output = json.dumps(sorted(store.keys()), ensure_ascii=False)
            else:
                output = "\n".join(sorted(store.keys()))
        if (args.command in ("read", "ttl", "keys", "check", "import")
                and (output or args.command != "keys")):
            try:
                print(output, flush=True)  # a reader that left shows here, not at exit
            except UnicodeEncodeError as exc:
                raise DataStoreError(
                    f"the output cannot be written in {sys.stdout.encoding}: {exc.reason}; "
                    "set PYTHONIOENCODING=utf-8") from None
    except BrokenPipeError:  # the reader left (| head): say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (DataStoreError, OSError) as exc:
        print(f"datastore: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _read_stdin() -> bytes:
    """Standard input as bytes, for json.loads to decode: never the locale's
    encoding, which would turn Latin-1 bytes into the wrong characters."""
    try:
        return sys.stdin.buffer.read()
    except (AttributeError, ValueError):  # None (started with <&-), or closed
        raise DataStoreValueError("no standard input to read the JSON from") from None


def _read_input(file: str) -> bytes:
    """The bytes of `file`, or of standard input for -."""
    if file == "-":
        return _read_stdin()
    with open(file, "rb") as source:
        return source.read()


# --- Export and import ----------------------------------------------------

def _export(store: DataStore, file: str) -> None:
    """Write every live key to `file` (- for standard output) as JSON Lines,
    sorted by key. A file is written whole beside its name, then renamed over
    it, so that a failed export leaves the old file (or none), never half a
    one; a pipe or a device (/dev/stdout) has no half to leave, and is
    written directly."""
    if file == "-":
        stdout: Optional[BinaryIO] = getattr(sys.stdout, "buffer", None)
        if stdout is None:  # sys.stdout is None (started with >&-)
            raise DataStoreValueError("no standard output to write the export to")
        stdout.writelines(_export_lines(store))  # UTF-8 whatever the locale
        stdout.flush()
        return
    target = os.path.realpath(file)  # through a symbolic link: keep the link
    if target in (f"{store.path}.dat", f"{store.path}.idx", f"{store.path}.lock"):
        raise DataStoreValueError(
            f"{file} is one of the store's own files; export to another file", path=store.path)
    try:
        is_regular = stat.S_ISREG(os.stat(target).st_mode)
    except FileNotFoundError:
        is_regular = True  # it will be
    if not is_regular:
        with open(target, "wb") as output:
            output.writelines(_export_lines(store))
        return
    folder, name = os.path.split(target)
    try:  # mode 0o600, as the store's own files
        descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    except OSError as exc:  # name the file asked for, not the temporary one
        raise OSError(exc.errno, exc.strerror, file) from None
    try:
        with open(descriptor, "wb") as output:
            output.writelines(_export_lines(store))
            output.flush()
            os.fsync(output.fileno())  # the data is on disk before the name points to it
        os.replace(temporary, target)
    except BaseException:  # even KeyboardInterrupt: leave no temporary file behind
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _export_lines(store: DataStore) -> Iterator[bytes]:
    """One line of UTF-8 JSON for each live key, sorted by key (by code point)."""
    for key in sorted(store.keys()):
        try:
            value = store.read(key)
            remaining = store.ttl(key)
        except KeyNotFoundError:  # expired or deleted since keys(): no longer live
            continue
        # ttl() gives the seconds left; the expiry itself is now plus those.
        expires_at = None if remaining is None else time.time() + remaining
        line = json.dumps(dict(zip(_EXPORT_FIELDS, (key, value, expires_at))),
                          ensure_ascii=False, separators=(",", ":"))
        yield (line + "\n").encode("utf-8")


def _parse_export(data: bytes, now: float) -> list[tuple[int, str, dict[str, Any],
                                                          Optional[float]]]:
    """Every line of an export as (line number, key, value, expires_at), blank
    lines left out, or raise DataStoreValueError naming the first bad line.

    A line is checked as the store would check it (key, value, a ttl before
    the year 9999), and a key may appear once, so that an import of a bad
    file writes nothing rather than stopping part-way.
    """
    entries = []
    first_line: dict[str, int] = {}
    # Split on \n alone: ensure_ascii=False leaves U+2028 and the like raw
    # inside strings, and str.splitlines() would break lines there.
    for number, raw in enumerate(data.split(b"\n"), 1):
        if not raw.strip(b" \t\r"):
            continue
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise _bad_line(number, f"not UTF-8 ({exc.reason} at byte {exc.start})") from None
        try:
            entry = json.loads(line)
        except (ValueError, RecursionError) as exc:
            raise _bad_line(number, f"not valid JSON: {exc}") from None
        if not isinstance(entry, dict):
            raise _bad_line(number, f"not a JSON object but {type(entry).__name__}")
        if sorted(entry) != sorted(_EXPORT_FIELDS):
            wrong = [f"no {name!r}" for name in _EXPORT_FIELDS if name not in entry] + [
                f"unexpected {name!r}" for name in entry if name not in _EXPORT_FIELDS]
            raise _bad_line(number, "must have exactly the fields key, value and "
                            f"expires_at ({', '.join(wrong)})")
        try:
            key = _encode_key(entry["key"])[0]
            _encode_value(key, entry["value"])
            expires_at = _expires_at(key, entry["expires_at"], now)
        except DataStoreError as exc:
            raise _bad_line(number, str(exc)) from None
        if key in first_line:
            raise _bad_line(number, f"key {key!r} is already on line {first_line[key]}")
        first_line[key] = number
        entries.append((number, key, entry["value"], expires_at))
    return entries


def _expires_at(key: str, given: object, now: float) -> Optional[float]:
    """A line's expires_at as a float, or None for never; one that has passed
    is returned too (import skips it)."""
    if given is None:
        return None
    if isinstance(given, bool) or not isinstance(given, (int, float)):
        raise DataStoreValueError(f"expires_at for {key!r} must be null or a number of "
                                  f"seconds since 1970, not {type(given).__name__}", key=key)
    try:
        seconds = float(given)
    except OverflowError:  # an int past float's range
        seconds = math.inf
    if not math.isfinite(seconds):
        raise DataStoreValueError(f"expires_at for {key!r} must be finite, got {seconds!r}",
                                  key=key)
    if seconds > now:
        try:
            _expiry(key, math.ceil(seconds - now), now)  # the ttl import will give
        except InvalidTTLError:
            raise DataStoreValueError(f"expires_at for {key!r} is past the year 9999, "
                                      f"got {seconds!r}", key=key) from None
    return seconds


def _bad_line(number: int, reason: str) -> DataStoreValueError:
    return DataStoreValueError(f"line {number}: {reason}; nothing imported")


def _import(store: DataStore, entries: list[tuple[int, str, dict[str, Any], Optional[float]]],
            replace: bool) -> str:
    """Write checked entries into `store`: create, or set if `replace`. Return
    the summary to print. A line whose expires_at has passed is skipped.

    Without `replace`, every live key is looked for before the first write,
    so that a clash writes nothing. What can fail only while writing (a full
    store or disk) stops at that line: the lines before it stay imported,
    and the error says how many.
    """
    if not replace:
        now = time.time()
        for number, key, _, expires_at in entries:
            if (expires_at is None or expires_at > now) and key in store:
                raise KeyExistsError(
                    f"line {number}: key {key!r} already exists; use --replace to "
                    "overwrite live keys; nothing imported", key=key, path=store.path)
    imported = expired = 0
    for number, key, value, expires_at in entries:
        ttl = None
        if expires_at is not None:
            remaining = expires_at - time.time()
            if remaining <= 0:
                expired += 1
                continue
            # Whole seconds, rounded up: the key never expires before the
            # exported instant, and at most a second after it.
            ttl = math.ceil(remaining)
        try:
            if replace:
                store.set(key, value, ttl=ttl)
            else:
                store.create(key, value, ttl=ttl)
        except (DataStoreError, OSError) as exc:
            raise DataStoreError(
                f"line {number}: {exc}; the lines before it stay imported "
                f"({_count(imported, 'key')})", path=store.path) from None
        imported += 1
    return f"imported {_count(imported, 'key')}" + (
        f" ({expired} expired, skipped)" if expired else "")


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


@contextlib.contextmanager
def _opened(path: Optional[str], timeout: float) -> Iterator[DataStore]:
    """The store, closed at the end. If the command failed, that failure is
    the one reported, not one of close() after it (a full disk, say)."""
    store = DataStore(path, timeout=timeout)
    try:
        yield store
    except BaseException:
        try:
            store.close()
        except (DataStoreError, OSError):
            pass
        raise
    store.close()
