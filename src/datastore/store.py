"""The store as users see it: ``DataStore``, and the same calls on a default store.

``DataStore`` knows users: it checks arguments (``codec``), holds the locks
(``locks``) and a mutex for threads, reads the clock and applies the ttl
rules, and says what went wrong in words a user can act on. The engine
below it knows only bytes, records and files.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, TypeVar

import fasteners  # type: ignore[import-untyped]  # it ships no type hints

from .codec import _decode_object, _encode_key, _encode_value, _expiry
from .engine import _Engine
from .errors import (
    CorruptStoreError, DataStoreError, DataStoreTypeError, DataStoreValueError,
    KeyExistsError, KeyNotFoundError, StoreClosedError, StoreForkedError,
    StoreFullError, StoreLockedError, _Locked, _log, _StoreFull,
)
from .format import _BLOCK, _LARGEST_STORE
from .locks import (
    _close_unlocked, _finalize, _hold_data_file, _release, _reserve, _unreserve,
)

MAX_STORE_BYTES = 1024 ** 3     # all of a store's files together, by default
MIN_STORE_BYTES = 64 * 1024     # room for the header and a few largest values


def _store_path(path: Any) -> Path:
    """The resolved path of a store, or raise if `path` cannot name one."""
    if path is None:
        return _default_path()
    try:
        text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    except TypeError:  # __fspath__ returned neither str nor bytes
        text = None
    if not isinstance(text, str):
        raise DataStoreTypeError(
            f"path must be a str or an os.PathLike giving a str, not {type(path).__name__}")
    text = str.__str__(text)
    if not text:
        raise DataStoreValueError("path must not be empty")
    if "\0" in text:
        raise DataStoreValueError(f"path {text!r} contains a NUL character")
    try:
        os.fsencode(text)
    except UnicodeEncodeError as exc:
        raise DataStoreValueError(
            f"path {text!r} cannot be encoded for the file system: {exc.reason}") from None
    name = os.path.basename(text)
    if text.endswith(("/", os.sep)) or name in (".", ".."):
        raise DataStoreValueError(
            f"path {text!r} names a folder, not a store: give the store a name in "
            f"it, such as {os.path.join(text, 'store')!r} (files store.dat, "
            "store.idx and store.lock)")
    resolved = Path(os.path.realpath(text))
    if resolved.is_dir():
        raise DataStoreValueError(
            f"path {text!r} is a folder; a store there would be the files "
            f"{resolved}.dat, .idx and .lock beside it. Give the store a name in "
            f"the folder instead, such as {str(resolved / 'store')!r}")
    return resolved


def _default_path() -> Path:
    """The default store: $DATASTORE_PATH if set, else `default` in the user's
    data folder for this platform, which must be the user's own."""
    if os.environ.get("DATASTORE_PATH"):
        return _store_path(os.environ["DATASTORE_PATH"])
    home = Path.home()
    base: Any
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local"
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = os.environ.get("XDG_DATA_HOME", "")
        if not os.path.isabs(base):  # the XDG spec says to ignore a relative one
            base = home / ".local" / "share"
    folder = Path(base) / "datastore"
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    if sys.platform != "win32":  # as ssh does with ~/.ssh
        info = os.stat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            raise DataStoreError(
                f"the default store's folder {folder} is not a folder of yours "
                f"(owner uid {info.st_uid}, you are {os.getuid()}); remove it or "
                "set DATASTORE_PATH to a store in a folder you own", path=folder)
        if info.st_mode & 0o077:  # readable by others: make it private
            os.chmod(folder, 0o700)
    return folder / "default"

_R = TypeVar("_R")


class DataStore:
    """A persistent store of JSON objects under short string keys.

    ``DataStore(path)`` opens the store whose files are ``path.dat``,
    ``path.idx`` and ``path.lock``, creating it (and missing folders) if
    needed; with no path it opens the default store in the user's data folder.
    The store stays locked against other processes until ``close()``.

    Raises ``StoreLockedError`` if another process (or another ``DataStore`` in
    this one) has it open, ``CorruptStoreError`` if its files are damaged or
    foreign, ``StoreFullError`` if it holds more than ``max_bytes`` allows,
    and ``DataStoreTypeError``/``DataStoreValueError`` for a bad ``path``,
    ``max_bytes`` or ``timeout``.
    """

    def __init__(self, path: Any = None, *, max_bytes: int = MAX_STORE_BYTES,
                 timeout: Optional[float] = 0) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
            raise DataStoreTypeError(
                f"max_bytes must be an int, not {type(max_bytes).__name__}")
        if not MIN_STORE_BYTES <= max_bytes <= _LARGEST_STORE:
            raise DataStoreValueError(
                f"max_bytes must be from {MIN_STORE_BYTES} to {_LARGEST_STORE}, "
                f"got {max_bytes}")
        if timeout is not None and (isinstance(timeout, bool)
                                    or not isinstance(timeout, (int, float))):
            raise DataStoreTypeError(
                f"timeout must be None or a number of seconds, not {type(timeout).__name__}")
        if timeout is not None and not 0 <= timeout <= 1e9:  # 1e9 s: 31 years
            raise DataStoreValueError(
                "timeout must be 0 to 1e9 seconds (or None to wait for ever), "
                f"got {timeout}")
        self.path = _store_path(path)
        self.max_bytes = max_bytes
        self._mutex = threading.Lock()  # guards the engine and its files
        self._pid = os.getpid()
        self._clock = time.time         # tests replace it
        self._engine: Optional[_Engine] = None
        self._closed = False            # close() has begun: no more calls

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = f"{self.path}.lock"
        identities, holder = _reserve(self, lock_path, f"{self.path}.dat")
        if holder is not None and holder._closed:  # its close() was cut short
            holder.close()  # so finish it
            identities, holder = _reserve(self, lock_path, f"{self.path}.dat")
        if holder is not None:
            raise StoreLockedError(
                f"store {self.path} is already open in this process; "
                "use that DataStore or close it first", path=self.path)
        self._identities = identities
        try:
            self._open(lock_path, timeout)
            assert self._engine is not None
            _hold_data_file(self, self._identities, self._engine.dat)
        except BaseException:  # even KeyboardInterrupt: leave nothing locked
            if self._engine is not None:
                self._finalizer.detach()
                self._engine.close_files()
                self._engine = None
                _release(self._lock)
            self._unregister()
            raise

    def _open(self, lock_path: str, timeout: Optional[float]) -> None:
        """Take both locks (waiting up to `timeout`) and open the files."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._lock = fasteners.InterProcessLock(lock_path)
        if not self._lock.acquire(blocking=timeout != 0, timeout=timeout):
            _close_unlocked(self._lock)
            raise self._in_use(timeout)
        try:
            os.chmod(lock_path, 0o600)
            self._new_engine(deadline, timeout)
        except BaseException:
            _release(self._lock)
            raise

    def _new_engine(self, deadline: Optional[float], timeout: Optional[float]) -> None:
        """Open the files (path.lock's lock held) as self._engine, with its
        finalizer, the engine's signals turned into the public errors. The
        engine is the store's before any file is open, so that whatever cuts
        this short, the files are closed."""
        engine = self._engine = _Engine(str(self.path), self.max_bytes)
        self._finalizer = weakref.finalize(self, _finalize, self._mutex, engine,
                                           self._lock, self._pid)
        try:
            engine.open(deadline)
        except BaseException as exc:
            self._finalizer.detach()
            engine.close_files()
            self._engine = None
            if isinstance(exc, _Locked):
                raise self._in_use(timeout) from None
            if not isinstance(exc, _StoreFull):
                raise
            raise StoreFullError(
                f"store {self.path} needs {exc.used + exc.needed} bytes, more "
                f"than max_bytes={self.max_bytes} (it was filled under a larger "
                "max_bytes, or was written by version 1.0 and needs room to "
                "convert); open it with a larger max_bytes (to shrink it: "
                "delete keys, then compact())", path=self.path) from None

    def _in_use(self, timeout: Optional[float]) -> StoreLockedError:
        waited = f"; gave up after waiting {timeout:g} s" if timeout else ""
        return StoreLockedError(
            f"store {self.path} is in use by another process; only one process "
            f"at a time may open it{waited}", path=self.path)

    def __repr__(self) -> str:
        state = "open" if self._engine is not None else "closed"
        return f"<DataStore {str(self.path)!r} {state}>"

    def __enter__(self) -> DataStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __len__(self) -> int:
        """The number of live keys (expired ones not counted). Reads no value."""
        self._check_process()
        with self._mutex:
            return self._run(_Engine.count, self._clock())

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is live. Reads no value (only, if the key is
        there, its record's head).

        Raises ``KeyTypeError``/``InvalidKeyError`` for a bad key.
        """
        key, key_bytes = _encode_key(key)
        self._check_process()
        with self._mutex:
            return self._run(_Engine.slot, key_bytes, self._clock()) is not None

    def __iter__(self) -> Iterator[str]:
        """Iterate over ``keys()``: a list taken when iteration starts."""
        return iter(self.keys())

    # --- Public operations ---

    def create(self, key: str, value: dict[str, Any], ttl: Optional[int] = None) -> None:
        """Store ``value`` (a dict) under a new ``key``, for ``ttl`` seconds or for ever.

        Raises ``KeyExistsError`` if the key is live, ``StoreFullError`` if the
        files have no room for it even after reusing the space of deleted and
        expired keys, and the ``KeyTypeError``/``InvalidKeyError``,
        ``ValueTypeError``/``InvalidValueError`` and
        ``TTLTypeError``/``InvalidTTLError`` pairs for bad arguments. The value
        is in the files when this returns.
        """
        self._write(key, value, ttl, replace=False)

    def set(self, key: str, value: dict[str, Any], ttl: Optional[int] = None) -> None:
        """Store ``value`` under ``key`` whether or not the key is live, with a
        new ``ttl`` (``None``: for ever).

        Atomic: the new value is written before the old one is given up, so
        after a crash at any instant the key holds one or the other. Raises
        like ``create``, but never ``KeyExistsError``. Writes leave room in
        ``max_bytes`` for one more copy of the largest value stored, which a
        ``set`` may use if its value takes no more 64-byte blocks than the
        one it replaces and it adds no ttl; so on a full store of values of
        one size, replacing values with ones of the same size keeps working
        (with several sizes, not always). The value is in the files when
        this returns.
        """
        self._write(key, value, ttl, replace=True)

    def get(self, key: str, default: Any = None) -> Any:
        """Return the value stored under ``key``, or ``default`` if the key was
        never created, was deleted or has expired.

        Raises ``KeyTypeError``/``InvalidKeyError`` for a bad key and
        ``CorruptStoreError`` if its record is damaged.
        """
        try:
            return self.read(key)
        except KeyNotFoundError:
            return default

    def keys(self) -> list[str]:
        """The live keys, as a list taken at the call, in no particular order.
        Reads no value from disk."""
        self._check_process()
        with self._mutex:
            keys = self._run(_Engine.keys, self._clock())
        # Decoded at once: b"\xff", which UTF-8 never holds, between them
        return b"\xff".join(keys).decode("utf-8", "surrogateescape").split("\udcff") \
            if keys else []

    def ttl(self, key: str) -> Optional[float]:
        """Seconds until ``key`` expires, or ``None`` if it has no ttl.

        Raises ``KeyNotFoundError`` if the key was never created, was deleted
        or has expired, and ``KeyTypeError``/``InvalidKeyError`` for a bad key.
        """
        key, key_bytes = _encode_key(key)
        self._check_process()
        with self._mutex:
            now = self._clock()
            expires_at = self._run(_Engine.expires_at, key_bytes, now)
        if expires_at is None:
            raise KeyNotFoundError(f"key {key!r} not found", key=key, path=self.path)
        return expires_at - now if expires_at else None

    def read(self, key: str) -> dict[str, Any]:
        """Return a new dict equal to the value stored under ``key``.

        Raises ``KeyNotFoundError`` if the key was never created, was deleted
        or has expired, ``KeyTypeError``/``InvalidKeyError`` for a bad key, and
        ``CorruptStoreError`` if its record is damaged.
        """
        key, key_bytes = _encode_key(key)
        self._check_process()
        with self._mutex:
            body = self._run(_Engine.get, key_bytes, self._clock())
        if body is None:
            raise KeyNotFoundError(f"key {key!r} not found", key=key, path=self.path)
        value = _decode_object(body)
        if value is None:  # CRC-valid, yet not our JSON
            raise CorruptStoreError(
                f"the value of {key!r} in {self.path}.dat is not a JSON object",
                key=key, path=f"{self.path}.dat")
        return value

    def delete(self, key: str) -> None:
        """Delete ``key``.

        Raises ``KeyNotFoundError`` if the key was never created, was deleted
        or has expired, and ``KeyTypeError``/``InvalidKeyError`` for a bad key.
        The delete is in the files when this returns.
        """
        key, key_bytes = _encode_key(key)
        self._check_process()
        with self._mutex:
            if not self._run(_Engine.remove, key_bytes, self._clock()):
                raise KeyNotFoundError(f"key {key!r} not found", key=key, path=self.path)

    def compact(self) -> None:
        """Reclaim all dead space now and give it back to the file system.

        Each write already does a little of this; call it to shrink the files
        at once. It takes time in proportion to the store and needs no disk
        space beyond the store's own files.
        """
        self._check_process()
        with self._mutex:
            self._run(_Engine.compact, self._clock())

    def check(self) -> dict[str, int]:
        """Read every record and return a report: ``keys`` (records in the
        index, expired ones not yet reclaimed included), ``live_keys``,
        ``damaged_records``, ``dead_bytes`` (free space inside the data file)
        and ``lost_keys`` (keys that opening found missing from a store
        damaged since it was closed cleanly).

        Raises ``CorruptStoreError``, with the same numbers, if any record is
        damaged or does not hold a JSON object, or keys were lost. It reads
        the whole store, so it takes time in proportion to it, and other
        calls wait meanwhile.
        """
        self._check_process()
        with self._mutex:
            engine = self._usable()
            damaged = [key for key, body in engine.records()
                       if body is None or _decode_object(body) is None]
            report = {"keys": engine.index.count, "live_keys": engine.count(self._clock()),
                      "damaged_records": len(damaged),
                      "dead_bytes": engine.free.blocks * _BLOCK, "lost_keys": engine.lost}
        if damaged:
            raise CorruptStoreError(
                f"store {self.path} has {len(damaged)} damaged record(s), such as "
                f"{damaged[0].decode('utf-8', 'replace')!r} ({report}); reading those "
                "keys raises CorruptStoreError: delete them, or restore a backup",
                path=self.path)
        if report["lost_keys"]:
            raise CorruptStoreError(
                f"store {self.path} was damaged after it was closed cleanly: opening "
                f"it lost {report['lost_keys']} key(s) ({report}); restore a backup to get them "
                "back", path=self.path)
        return report

    def sync(self) -> None:
        """Make every operation that has returned survive a power cut (fsync)."""
        self._check_process()
        with self._mutex:
            self._usable().sync()

    def close(self) -> None:
        """Write the index, fsync, and release the lock. Calling it again does nothing.

        After it, every operation raises ``StoreClosedError``. The lock is
        released even if writing fails (the next open then scans the data
        file). In a process forked from the one that opened the store it only
        forgets the store, taking no lock: the files and the lock belong to
        the parent. A store that is garbage collected, or still open when
        Python exits, is closed the same way, but ``close()`` (or ``with``)
        says when.
        """
        if os.getpid() != self._pid:
            engine, self._engine = self._engine, None
            if engine is not None:
                self._finalizer.detach()
                engine.close_files()
            return
        with self._mutex:
            # Each step can be done again: a close() (or a new DataStore on
            # these files) finishes one that an interrupt cut short.
            self._closed = True
            engine = self._engine
            try:
                if engine is not None:
                    self._finalizer.detach()
                    engine.close(self._clock())  # the snapshot; it closes the files
            finally:  # even if writing it failed
                if engine is not None:
                    engine.close_files()  # (done, unless an interrupt cut close() short)
                    self._engine = None
                _release(self._lock)
                self._unregister()

    # --- Private helpers ---

    def _unregister(self) -> None:
        _unreserve(self, self._identities)

    def _write(self, key: str, value: object, ttl: object, replace: bool) -> None:
        """create() (replace=False) or set() (replace=True)."""
        key, key_bytes = _encode_key(key)
        body = _encode_value(key, value)
        self._check_process()
        with self._mutex:
            now = self._clock()
            expires_at = _expiry(key, ttl, now)
            try:
                if not self._run(_Engine.put, key_bytes, body, expires_at, now, replace):
                    raise KeyExistsError(f"key {key!r} already exists", key=key,
                                         path=self.path)
            except _StoreFull as full:
                if full.reason:
                    raise StoreFullError(f"store {self.path} cannot take {key!r}: "
                                         f"{full.reason}", key=key, path=self.path) from None
                kept = ("counting room kept for replacing the largest value, unless "
                        "the new one takes no more room than the old" if replace else
                        "with room kept for replacing the largest value")
                raise StoreFullError(
                    f"store {self.path} is full: writing {key!r} needs {full.needed} "
                    f"more bytes ({kept}), "
                    f"and its files already use {full.used} of max_bytes="
                    f"{self.max_bytes}; delete keys or open it with a larger max_bytes",
                    key=key, path=self.path) from None

    def _check_process(self) -> None:
        """Refuse a forked child, before any lock: a thread of the parent may
        have held one at the fork, and the child's copy would never open.
        (A child's engines are marked `forked` at the fork, see locks: so
        only a closed store asks the system which process this is.)"""
        engine = self._engine
        if engine is not None and not engine.forked:
            return
        if os.getpid() != self._pid:
            raise StoreForkedError(
                f"store {self.path} was opened by process {self._pid}, not this "
                "one; a child process must open the store itself, after the "
                "parent has closed it", path=self.path)

    def _usable(self) -> _Engine:
        """The engine, under the mutex; the process is checked before it."""
        if self._engine is None or self._closed:
            raise StoreClosedError(f"store {self.path} is closed", path=self.path)
        if self._engine.busy or self._engine.index.damaged:
            self._reload()
        return self._engine

    def _run(self, method: Callable[..., _R], *args: Any) -> _R:
        """method(engine, *args), under the mutex. If the index file turns
        out damaged (its pages are checked as they are first used), the
        store reads its files again, rebuilding it, and calls once more."""
        engine = self._usable()
        try:
            return method(engine, *args)
        except CorruptStoreError:
            if not engine.index.damaged:
                raise
        return method(self._usable(), *args)

    def _reload(self) -> None:
        """Read the files again, as an open after a crash does: a write was
        cut short by an exception not its own (see engine._unit), so memory
        may not match the files. If they cannot be opened again, the store
        is closed, and the error says why."""
        engine = self._engine
        assert engine is not None
        _log.warning("datastore %s: %s", self.path, "its index file is damaged; "
                     "rebuilding it from the data file" if engine.index.damaged else
                     "a write was interrupted part-way; reading the files again")
        try:
            self._finalizer.detach()
            engine.close_files()  # no snapshot: the header still says open
            self._engine = None
            self._new_engine(time.monotonic(), 0)
        except BaseException:
            self._closed = True
            engine.close_files()
            _release(self._lock)
            self._unregister()
            raise


# --- Module-level functions on a default store ----------------------------

_T = TypeVar("_T")
_default_store: Optional[DataStore] = None
_default_store_lock = threading.Lock()


def _new_default_lock() -> None:
    """Another thread may have held the default store's lock at a fork."""
    global _default_store_lock
    _default_store_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_default_lock)


def _default() -> DataStore:
    global _default_store
    with _default_store_lock:
        if _default_store is None or _default_store._closed:
            if _default_store is not None:
                _default_store.close()  # finishes one that an interrupt cut short
            _default_store = DataStore()
        return _default_store


def close() -> None:
    """Close the default store, if it is open; the next call opens it again."""
    with _default_store_lock:
        if _default_store is not None:
            _default_store.close()


def _on_default(call: Callable[[DataStore], _T]) -> _T:
    """call(the default store); again on a reopened one if another thread
    closed it (datastore.close()) between the lookup and the call."""
    try:
        return call(_default())
    except StoreClosedError:
        return call(_default())


def create(key: str, value: dict[str, Any], ttl: Optional[int] = None) -> None:
    """``DataStore.create`` on the default store (opened on first use)."""
    _on_default(lambda store: store.create(key, value, ttl))


def read(key: str) -> dict[str, Any]:
    """``DataStore.read`` on the default store (opened on first use)."""
    return _on_default(lambda store: store.read(key))


def delete(key: str) -> None:
    """``DataStore.delete`` on the default store (opened on first use)."""
    _on_default(lambda store: store.delete(key))


def set(key: str, value: dict[str, Any], ttl: Optional[int] = None) -> None:  # noqa: A001
    """``DataStore.set`` on the default store (opened on first use)."""
    _on_default(lambda store: store.set(key, value, ttl))


def get(key: str, default: Any = None) -> Any:
    """``DataStore.get`` on the default store (opened on first use)."""
    return _on_default(lambda store: store.get(key, default))


def keys() -> list[str]:
    """``DataStore.keys`` on the default store (opened on first use)."""
    return _on_default(lambda store: store.keys())


def ttl(key: str) -> Optional[float]:
    """``DataStore.ttl`` on the default store (opened on first use)."""
    return _on_default(lambda store: store.ttl(key))
