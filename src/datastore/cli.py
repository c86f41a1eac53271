"""The command line: ``datastore [--path PATH] [--timeout SECONDS] COMMAND ...``.

``export`` writes a store's content as JSON Lines, one key a line:
``{"key": ..., "value": {...}, "expires_at": ...}``, where ``expires_at``
is the Unix time (``time.time()``) the key expires at, or null. An
absolute time, not a ttl, so that a file read days later still says when
each key expires.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
import tempfile
import time
from typing import BinaryIO, Iterator, Optional

from .errors import (
    DataStoreError, DataStoreValueError, InvalidValueError, KeyNotFoundError,
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
    args = parser.parse_args(argv)
    try:
        if args.command in ("create", "set"):
            text = _read_stdin() if args.json == "-" else args.json
            try:
                value = json.loads(text)  # bytes from stdin: UTF-8 (or -16, -32) only
            except (ValueError, RecursionError) as exc:
                raise InvalidValueError(f"JSON for {args.key!r} is not valid: {exc}",
                                        key=args.key) from None
        with DataStore(args.path, timeout=args.timeout) as store:
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
            elif args.json:
                output = json.dumps(sorted(store.keys()), ensure_ascii=False)
            else:
                output = "\n".join(sorted(store.keys()))
        if args.command in ("read", "ttl", "keys", "check") and (output or args.command != "keys"):
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


# --- Export ---------------------------------------------------------------

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
    if target in (f"{store.path}.dat", f"{store.path}.dir", f"{store.path}.lock"):
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
