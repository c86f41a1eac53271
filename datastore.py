"""A small persistent key-value store in one file, for one process at a time.

    >>> from datastore import DataStore
    >>> with DataStore(folder / "people") as store:
    ...     store.create("ada", {"born": 1815, "known for": "the first program"})
    ...     store.read("ada")["born"]
    1815

Copy this file into your project; its only dependency is ``fasteners``.

Guarantees
----------
* Keys are ``str`` of 1 to 32 characters; values are ``dict`` objects of at most
  16 KiB as compact UTF-8 JSON, and ``read`` returns a dict equal to the one
  stored (values JSON would change, such as tuples or non-string keys, are
  refused). ``create`` never overwrites a live key.
* A key created with ``ttl=N`` is gone N seconds (wall-clock time) after the
  create returned; it can then be created again.
* The store's files never add up to more than ``max_bytes`` (1 GiB by default)
  after an operation; space freed by deletes and expiry is reclaimed.
* Every operation that returned is on disk: killing the process at any instant
  loses nothing that returned, and the operation that was running is either
  wholly done or not done at all. ``sync()`` and ``close()`` also fsync, so what
  they cover survives a power cut.
* One process at a time may open a store; any number of its threads may use it.
* Every error is a ``DataStoreError``, and a call that raises leaves the files as
  they were.

On disk
-------
A store named ``path`` is a ``dbm.dumb`` database, ``path.dat`` and
``path.dir``, plus ``path.lock`` for the inter-process lock. ``dbm.dumb`` keeps
each value at a 512-byte boundary of ``.dat`` and writes one line
``'key', (offset, size)`` to ``.dir`` per key it adds. Each value we give it is
a *record* that describes itself::

    magic "DSr1" | kind (1 value, 2 tombstone) | key length | expiry bucket
    | expires_at (float seconds, 0 = never) | body length | CRC-32 | key | body

where the body is the value as compact JSON. The value of a reserved key, which
no user key can equal, is the store's *header* at offset 0 of ``.dat``: its
state (open or closed) and, when closed, the size and CRC-32 of the ``.dir``
written at that close.

We use ``dbm.dumb`` only in the ways that are safe:

* create of a new key: ``db[key] = record`` appends the record to ``.dat``,
  then a line to ``.dir``;
* create over a dead (deleted or expired) key: ``db[key] = record`` rewrites
  the dead record in place, or appends it if it is larger;
* delete: ``db[key] = tombstone``, a small record written over the live one in
  place. We never call ``del db[key]``, which rewrites the whole index;
* read: the (offset, size) in dbm.dumb's index, read through one handle we keep
  open, because ``db[key]`` opens ``.dat`` anew on every call.

Why a crash cannot hurt
-----------------------
``.dat`` is the truth; ``.dir`` is only a cache of it. At open the header is
marked *open* (and fsynced) before anything else is written, and only a clean
``close()`` marks it *closed*, after ``dbm.dumb`` has rewritten ``.dir`` and
both files are fsynced. At the next open, ``.dir`` is used only if the header
says *closed* and its size and CRC-32 match; otherwise the index is rebuilt by
scanning ``.dat``. A record is valid only if its CRC-32 matches, so a torn
write is never mistaken for data, and JSON text cannot contain a valid record
header. For each key the valid record at the highest offset wins: ``dbm.dumb``
only moves a value forward (to the end of the file), and we only let it
overwrite or move records that are already dead, so older copies are dead. Each
create or delete that returned has its whole record in ``.dat`` (process
crash), and each one before ``sync()`` or ``close()`` is also fsynced (power
loss).

Compaction writes the live records into fresh files ``path.compact.dat`` and
``path.compact.dir`` (header *closed*), fsyncs them, and then renames
``.compact.dat`` over ``.dat``: that rename is the commit. Renaming
``.compact.dir`` over ``.dir`` follows; if a crash comes between the two, the
next open sees ``.compact.dir`` without ``.compact.dat`` and finishes the
rename, and if it comes before the commit, the next open deletes the unfinished
``.compact.*`` files.

Limits
------
* The index lives in memory, as it does in ``dbm.dumb`` (about 190 bytes per
  key); values are read from disk on every call and never cached.
* Opening a store reads its whole index: about a second per 100,000 keys.
  After a crash, and during compaction, writing fresh files takes about 60
  microseconds per live key.
* The lock is a POSIX record lock (``fasteners``); it does not work on network
  file systems.
"""

import argparse
import atexit
import dbm.dumb
import json
import math
import os
import struct
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import fasteners

__version__ = "1.0.0"
__all__ = [
    "DataStore", "create", "read", "delete",
    "MAX_KEY_LENGTH", "MAX_VALUE_BYTES", "MAX_STORE_BYTES", "MIN_STORE_BYTES",
    "DataStoreError", "DataStoreTypeError", "DataStoreValueError",
    "KeyTypeError", "InvalidKeyError", "ValueTypeError", "InvalidValueError",
    "TTLTypeError", "InvalidTTLError", "KeyExistsError", "KeyNotFoundError",
    "StoreFullError", "StoreLockedError", "StoreClosedError",
    "StoreForkedError", "CorruptStoreError",
]

MAX_KEY_LENGTH = 32             # characters (code points)
MAX_VALUE_BYTES = 16 * 1024     # compact UTF-8 JSON
MAX_STORE_BYTES = 1024 ** 3     # all of a store's files together, by default
MIN_STORE_BYTES = 64 * 1024     # room for the header and a few largest values

# dbm.dumb starts every value at a multiple of this many bytes of .dat.
_BLOCK = 512
# The latest expiry we accept: 9999-12-31 23:59:59 UTC, the end of datetime.
_LATEST_EXPIRY = 253402300799

# The header: magic, state, size and CRC-32 of the .dir written at the last
# clean close, and a CRC-32 of the fields before it.
_HEADER = struct.Struct("<8sB3xQII")
_HEADER_MAGIC = b"DataStr1"
_HEADER_KEY = b"\xffdatastore header"  # 0xff never occurs in UTF-8 keys
_STATE_CLOSED, _STATE_OPEN = 0, 1

# A record: magic, kind, key length, expiry bucket exponent, expires_at, body
# length, then a CRC-32 of the fields before it, the key and the body.
_RECORD = struct.Struct("<4sBBBxdII")
_RECORD_MAGIC = b"DSr1"
_VALUE, _TOMBSTONE = 1, 2
_CRC_AT = _RECORD.size - 4
_MAX_RECORD = _RECORD.size + 4 * MAX_KEY_LENGTH + MAX_VALUE_BYTES


# --- Exceptions -----------------------------------------------------------

class DataStoreError(Exception):
    """Base of every error this module raises.

    ``key`` and ``path``, where they apply, name the key and the store.
    """

    def __init__(self, message, *, key=None, path=None):
        super().__init__(message)
        self.key = key
        self.path = path

    def __str__(self):
        return str(self.args[0]) if self.args else ""


class DataStoreTypeError(DataStoreError, TypeError):
    """An argument has the wrong type."""


class DataStoreValueError(DataStoreError, ValueError):
    """An argument has the right type but a wrong value, or is over a limit."""


class KeyTypeError(DataStoreTypeError):
    """The key is not a ``str``."""


class InvalidKeyError(DataStoreValueError):
    """The key is empty, longer than 32 characters, or not encodable."""


class ValueTypeError(DataStoreTypeError):
    """The value is not a ``dict``."""


class InvalidValueError(DataStoreValueError):
    """The value is not plain JSON, or is larger than 16 KiB as JSON."""


class TTLTypeError(DataStoreTypeError):
    """The ttl is not ``None`` or an ``int``."""


class InvalidTTLError(DataStoreValueError):
    """The ttl is not positive, or is too large."""


class KeyExistsError(DataStoreError):
    """``create`` was called for a key that is live."""


class KeyNotFoundError(DataStoreError, KeyError):
    """The key was never created, was deleted, or has expired."""


class StoreFullError(DataStoreError):
    """The write would take the store's files over ``max_bytes``."""


class StoreLockedError(DataStoreError):
    """The store is open elsewhere: in another process, or in this one."""


class StoreClosedError(DataStoreError):
    """The store was closed."""


class StoreForkedError(DataStoreError):
    """The store was opened by another process, which this one was forked from."""


class CorruptStoreError(DataStoreError):
    """A store file is damaged or is not a store file."""


# --- Helpers --------------------------------------------------------------

def _encode_key(key):
    """Return the key as UTF-8 bytes, or raise if it is not a valid key."""
    if not isinstance(key, str):
        raise KeyTypeError(f"key must be a str, not {type(key).__name__}")
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise InvalidKeyError(
            f"key must be 1 to {MAX_KEY_LENGTH} characters, "
            f"got {len(key)}: {key!r}", key=key)
    try:
        return key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(f"key {key!r} cannot be encoded as UTF-8: {exc.reason}",
                              key=key) from None


def _encode_value(key, value):
    """Return the value as compact UTF-8 JSON, or raise if it is not storable."""
    if not isinstance(value, dict):
        raise ValueTypeError(
            f"value for {key!r} must be a dict, not {type(value).__name__}", key=key)
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
        body = text.encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        # json's own messages ("Object of type set is not JSON serializable",
        # "Circular reference detected", ...) say what is wrong.
        raise InvalidValueError(f"value for {key!r} is not plain JSON: {exc}",
                                key=key) from None
    if len(body) > MAX_VALUE_BYTES:
        raise InvalidValueError(
            f"value for {key!r} is {len(body)} bytes as JSON; "
            f"the limit is {MAX_VALUE_BYTES}", key=key)
    # read() must return what was stored, so refuse what JSON would change:
    # tuples (become lists) and non-string object keys (become strings).
    if json.loads(text) != value:
        raise InvalidValueError(
            f"value for {key!r} would not read back equal: use lists rather "
            "than tuples and str keys only", key=key)
    return body


def _check_ttl(key, ttl, now):
    """Return expires_at (0.0 for never) and the expiry bucket exponent."""
    if ttl is None:
        return 0.0, 0
    if isinstance(ttl, bool) or not isinstance(ttl, int):
        raise TTLTypeError(
            f"ttl for {key!r} must be None or an int of seconds, "
            f"not {type(ttl).__name__}", key=key)
    if ttl <= 0:
        raise InvalidTTLError(f"ttl for {key!r} must be positive, got {ttl}", key=key)
    if ttl > _LATEST_EXPIRY - now:
        raise InvalidTTLError(
            f"ttl for {key!r} is too large: {ttl} seconds is past the year 9999",
            key=key)
    # Expiry buckets are about a sixteenth of the ttl wide, so the number of
    # buckets stays small however many keys carry a ttl.
    return now + ttl, max(0, ttl.bit_length() - 4)


def _bucket(expires_at, exponent):
    """The time at which a record is counted as reclaimable (>= expires_at)."""
    width = 1 << exponent
    return math.ceil(expires_at / width) * width


class _Fields(NamedTuple):
    kind: int
    key: bytes
    expires_at: float
    exponent: int
    body: bytes

    @property
    def size(self):  # of the whole record
        return _RECORD.size + len(self.key) + len(self.body)


def _pack_record(fields):
    kind, key, expires_at, exponent, body = fields
    head = _RECORD.pack(_RECORD_MAGIC, kind, len(key), exponent, expires_at,
                        len(body), 0)[:_CRC_AT]
    crc = zlib.crc32(body, zlib.crc32(key, zlib.crc32(head)))
    return b"".join((head, crc.to_bytes(4, "little"), key, body))


def _unpack_record(record):
    """Return the record's _Fields, or None if it is not a valid record."""
    if len(record) < _RECORD.size:
        return None
    magic, kind, key_len, exponent, expires_at, body_len, crc = (
        _RECORD.unpack_from(record))
    if (magic != _RECORD_MAGIC or kind not in (_VALUE, _TOMBSTONE)
            or len(record) != _RECORD.size + key_len + body_len
            or zlib.crc32(record[_RECORD.size:],
                          zlib.crc32(record[:_CRC_AT])) != crc):
        return None
    key = record[_RECORD.size:_RECORD.size + key_len]
    return _Fields(kind, key, expires_at, exponent, record[_RECORD.size + key_len:])


def _record_length(head):
    """The length a record starting with `head` claims, if plausible."""
    if len(head) < _RECORD.size or not head.startswith(_RECORD_MAGIC):
        return None
    _, _, key_len, _, _, body_len, _ = _RECORD.unpack_from(head)
    length = _RECORD.size + key_len + body_len
    return length if length <= _MAX_RECORD else None


def _is_live(fields, now):
    return fields.kind == _VALUE and (fields.expires_at == 0.0
                                      or now < fields.expires_at)


def _blocks(size):
    return -(-size // _BLOCK)


def _index_line_size(key, pos, size):
    """Bytes dbm.dumb writes to .dir for one key (it writes Latin-1 text)."""
    line = "%r, %r\n" % (key.decode("Latin-1"), (pos, size))
    return len(line) + len(os.linesep) - 1


def _pack_header(state, dir_size=0, dir_crc=0):
    head = _HEADER.pack(_HEADER_MAGIC, state, dir_size, dir_crc, 0)[:-4]
    return head + zlib.crc32(head).to_bytes(4, "little")


def _read_header(dat_path):
    """Return (state, dir_size, dir_crc), or None for an empty data file."""
    with open(dat_path, "rb") as f:
        data = f.read(_HEADER.size)
    if not data:
        return None
    if (len(data) < _HEADER.size or not data.startswith(_HEADER_MAGIC)
            or zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "little")):
        raise CorruptStoreError(
            f"{dat_path} is not a datastore data file (bad header); "
            "move it away or open a different path", path=dat_path)
    _, state, dir_size, dir_crc, _ = _HEADER.unpack(data)
    return state, dir_size, dir_crc


def _write_header(dat_path, state, dir_size=0, dir_crc=0):
    # 28 bytes at offset 0, inside one disk sector: written whole or not at all.
    with open(dat_path, "r+b") as f:
        f.write(_pack_header(state, dir_size, dir_crc))
        f.flush()
        os.fsync(f.fileno())


def _size_and_crc(path):
    size, crc = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
    return size, crc


def _fsync_file(path):
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder):
    if os.name == "posix":  # elsewhere a rename is durable without this
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(*paths):
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _default_path():
    """The default store in the user's data folder for this platform."""
    home = Path.home()
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
    return folder / "default"


# Stores open in this process, by resolved path. A POSIX lock does not keep a
# process from opening the same files twice, and closing the second one's lock
# file would silently drop the first one's lock, so we refuse that here.
_open_stores = {}
_open_stores_lock = threading.Lock()


@atexit.register
def _close_open_stores():
    """Close every store still open when Python exits, as a clean close."""
    for store in list(_open_stores.values()):
        store.close()


class _Space:
    """What compaction would keep of .dat: the 512-byte blocks of value
    records, and for those with a ttl, how many bytes expire by when.

    Expired values still count as live here; ``expired(now)`` says how much of
    ``live`` they are. Buckets are kept per expiry time rounded up, so there
    are few of them (see ``_check_ttl``).
    """

    def __init__(self):
        self.live = _BLOCK  # the header's block
        self.expiring = {}  # bucket time -> bytes

    def add(self, fields, sign=1):
        """Count a value record as live (sign=-1: no longer)."""
        slot = sign * _blocks(fields.size) * _BLOCK
        self.live += slot
        if fields.expires_at:
            bucket = _bucket(fields.expires_at, fields.exponent)
            left = self.expiring.get(bucket, 0) + slot
            if left:
                self.expiring[bucket] = left
            else:
                del self.expiring[bucket]

    def expired(self, now):
        return sum(size for bucket, size in self.expiring.items() if bucket <= now)


# --- The store ------------------------------------------------------------

class DataStore:
    """A persistent store of JSON objects under short string keys.

    ``DataStore(path)`` opens the store whose files are ``path.dat``,
    ``path.dir`` and ``path.lock``, creating it (and missing folders) if
    needed; with no path it opens the default store in the user's data folder.
    The store stays locked against other processes until ``close()``.

    Raises ``StoreLockedError`` if another process (or another ``DataStore`` in
    this one) has it open, ``CorruptStoreError`` if its files are damaged or
    foreign, and ``DataStoreTypeError``/``DataStoreValueError`` for a bad
    ``path`` or a ``max_bytes`` below ``MIN_STORE_BYTES``.
    """

    def __init__(self, path=None, *, max_bytes=MAX_STORE_BYTES):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int):
            raise DataStoreTypeError(
                f"max_bytes must be an int, not {type(max_bytes).__name__}")
        if max_bytes < MIN_STORE_BYTES:
            raise DataStoreValueError(
                f"max_bytes must be at least {MIN_STORE_BYTES}, got {max_bytes}")
        if path is None:
            path = _default_path()
        elif not isinstance(path, (str, os.PathLike)) or isinstance(
                os.fspath(path), bytes):
            raise DataStoreTypeError(
                f"path must be a str or os.PathLike, not {type(path).__name__}")
        elif not os.fspath(path):
            raise DataStoreValueError("path must not be empty")
        self.path = Path(os.path.realpath(path))
        self.max_bytes = max_bytes
        self._dat = f"{self.path}.dat"
        self._dir = f"{self.path}.dir"
        self._bak = f"{self.path}.bak"  # dbm.dumb's copy of the old .dir
        self._compact_base = f"{self.path}.compact"
        self._mutex = threading.Lock()  # guards everything below, and the files
        self._pid = os.getpid()
        self._clock = time.time         # tests replace it
        self._db = None                 # the dbm.dumb database while open
        self._reader = None             # .dat, opened once for reading

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _open_stores_lock:
            if str(self.path) in _open_stores:
                raise StoreLockedError(
                    f"store {self.path} is already open in this process; "
                    "use that DataStore or close it first", path=self.path)
            self._lock = fasteners.InterProcessLock(f"{self.path}.lock")
            if not self._lock.acquire(blocking=False):
                self._lock.lockfile.close()  # we hold no lock on it to lose
                raise StoreLockedError(
                    f"store {self.path} is in use by another process; "
                    "only one process at a time may open it", path=self.path)
            try:
                os.chmod(f"{self.path}.lock", 0o600)
                self._open_files()
            except BaseException:
                if self._db is not None:
                    self._detach()
                self._lock.release()
                raise
            _open_stores[str(self.path)] = self

    def __repr__(self):
        state = "open" if self._db is not None else "closed"
        return f"<DataStore {str(self.path)!r} {state}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # --- Public operations ---

    def create(self, key, value, ttl=None):
        """Store ``value`` (a dict) under a new ``key``, for ``ttl`` seconds or for ever.

        Raises ``KeyExistsError`` if the key is live, ``StoreFullError`` if the
        store has no room even after reclaiming dead records, and the
        ``KeyTypeError``/``InvalidKeyError``, ``ValueTypeError``/
        ``InvalidValueError`` and ``TTLTypeError``/``InvalidTTLError`` pairs for
        bad arguments. The value is on disk when this returns.
        """
        key_bytes = _encode_key(key)
        body = _encode_value(key, value)
        with self._mutex:
            self._check_usable()
            now = self._clock()
            expires_at, exponent = _check_ttl(key, ttl, now)
            new = _Fields(_VALUE, key_bytes, expires_at, exponent, body)
            record = _pack_record(new)
            old = self._get(key_bytes)
            if old is not None and _is_live(old, now):
                raise KeyExistsError(f"key {key!r} already exists", key=key,
                                     path=self.path)
            growth = self._growth(key_bytes, old, len(record))
            if self._should_compact(growth, now):
                self._compact()
                old = None  # compaction dropped the dead record
                growth = self._growth(key_bytes, None, len(record))
            used = self._dat_size + self._dir_size
            if used + sum(growth) > self.max_bytes:
                raise StoreFullError(
                    f"store {self.path} is full: creating {key!r} needs "
                    f"{sum(growth)} more bytes, and its files already use {used} of "
                    f"max_bytes={self.max_bytes}; delete keys or open it with a "
                    "larger max_bytes", key=key, path=self.path)
            self._put(key_bytes, record, old, growth)
            if self._space is not None:
                self._space.add(new)

    def read(self, key):
        """Return a new dict equal to the value stored under ``key``.

        Raises ``KeyNotFoundError`` if the key was never created, was deleted
        or has expired, and ``KeyTypeError``/``InvalidKeyError`` for a bad key.
        """
        key_bytes = _encode_key(key)
        with self._mutex:
            self._check_usable()
            body = self._get_live(key, key_bytes).body
        try:
            return json.loads(body.decode("utf-8"))
        except (ValueError, RecursionError):  # CRC-valid, yet not our JSON
            raise CorruptStoreError(
                f"the value of {key!r} in {self._dat} is not valid JSON",
                key=key, path=self._dat) from None

    def delete(self, key):
        """Delete ``key``.

        Raises ``KeyNotFoundError`` if the key was never created, was deleted
        or has expired, and ``KeyTypeError``/``InvalidKeyError`` for a bad key.
        The delete is on disk when this returns.
        """
        key_bytes = _encode_key(key)
        with self._mutex:
            self._check_usable()
            old = self._get_live(key, key_bytes)
            record = _pack_record(_Fields(_TOMBSTONE, key_bytes, 0.0, 0, b""))
            self._put(key_bytes, record, old, self._growth(key_bytes, old, len(record)))

    def compact(self):
        """Rewrite the files without dead records, now.

        The store does this by itself when it needs the room, or when half of
        ``.dat`` is dead; call it to give disk space back sooner. Needs free
        disk space for the live data while it runs.
        """
        with self._mutex:
            self._check_usable()
            self._compact()

    def sync(self):
        """Make every operation that has returned survive a power cut (fsync)."""
        with self._mutex:
            self._check_usable()
            _fsync_file(self._dat)

    def close(self):
        """Write the index, fsync, and release the lock. Calling it again does nothing.

        After it, every operation raises ``StoreClosedError``. In a process
        forked from the one that opened the store it only forgets the store:
        the files and the lock belong to the parent.
        """
        with self._mutex:
            if self._db is None:
                return
            try:
                if os.getpid() != self._pid:
                    self._detach()
                    return
                try:
                    self._close_dbm()  # dbm.dumb rewrites .dir (via .bak)
                    _fsync_file(self._dir)
                    dir_size, dir_crc = _size_and_crc(self._dir)
                    _fsync_file(self._dat)
                    _write_header(self._dat, _STATE_CLOSED, dir_size, dir_crc)
                    _remove(self._bak)
                finally:
                    self._db = None
                    self._lock.release()
            finally:
                with _open_stores_lock:
                    if _open_stores.get(str(self.path)) is self:
                        del _open_stores[str(self.path)]

    # --- Opening and recovery ---

    def _open_files(self):
        """Open the dbm.dumb database, recovering from a crash if needed."""
        self._finish_compaction()
        header = _read_header(self._dat) if os.path.exists(self._dat) else None
        if header is None:
            if os.path.exists(self._dir) and os.path.getsize(self._dir) > 0:
                raise CorruptStoreError(
                    f"{self._dir} exists but {self._dat} is missing or empty; "
                    "restore the data file or move the index away", path=self._dir)
            # A new store: write an empty one, as compaction would.
            space = self._write_fresh(())
            self._switch_to_fresh()
        elif (header[0] == _STATE_CLOSED and os.path.exists(self._dir)
                and _size_and_crc(self._dir) == header[1:]):
            space = None  # not counted until it is needed
        else:  # not closed cleanly, or the index was changed: rebuild it
            space = self._write_fresh(self._recovered_records())
            self._switch_to_fresh()
        self._db = self._open_dbm()
        self._start_accounting(space)
        _remove(self._bak)
        _write_header(self._dat, _STATE_OPEN)

    def _open_dbm(self):
        """Open the dbm.dumb database, and .dat once for reading records."""
        try:
            db = dbm.dumb.open(str(self.path), "w", 0o600)
        except (SyntaxError, ValueError, TypeError, RecursionError,
                MemoryError, UnicodeError) as exc:
            raise CorruptStoreError(f"cannot read the index {self._dir}: {exc}",
                                    path=self._dir) from None
        if _HEADER_KEY not in db:
            db.close()
            raise CorruptStoreError(f"the index {self._dir} has no header entry",
                                    path=self._dir)
        # Unbuffered, so it never serves bytes dbm.dumb has since overwritten.
        self._reader = open(self._dat, "rb", buffering=0)
        return db

    def _close_dbm(self):
        """Close dbm.dumb (it rewrites .dir) and the reader."""
        self._reader.close()
        self._reader = None
        db, self._db = self._db, None
        db.close()

    def _recovered_records(self):
        """Yield (key, record, fields) for each live key, found by scanning .dat.

        For each key the valid record at the highest offset is the newest one.
        """
        newest = {}
        with open(self._dat, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            pos = _BLOCK  # block 0 holds the header
            while pos < size:
                f.seek(pos)
                head = f.read(_RECORD.size)
                length = _record_length(head)
                if length is not None and pos + length <= size:
                    fields = _unpack_record(head + f.read(length - len(head)))
                    if fields is not None:
                        newest[fields.key] = (pos, length)
                        pos += _blocks(length) * _BLOCK
                        continue
                pos += _BLOCK  # torn or unused space: try the next block
            now = self._clock()
            for key, (pos, length) in newest.items():
                f.seek(pos)
                record = f.read(length)
                fields = _unpack_record(record)
                if _is_live(fields, now):
                    yield key, record, fields

    def _finish_compaction(self):
        """Finish a compaction that committed, or discard one that did not."""
        base = self._compact_base
        if os.path.exists(base + ".dat"):  # not committed: throw it away
            self._discard_fresh()
        elif os.path.exists(base + ".dir"):  # committed: finish the switch
            os.replace(base + ".dir", self._dir)
            _remove(base + ".bak")
            _fsync_folder(self.path.parent)

    # --- Reading and writing records ---

    def _check_usable(self):
        if os.getpid() != self._pid:
            raise StoreForkedError(
                f"store {self.path} was opened by process {self._pid}, not this "
                "one; a child process must open the store itself, after the "
                "parent has closed it", path=self.path)
        if self._db is None:
            raise StoreClosedError(f"store {self.path} is closed", path=self.path)

    def _check_record(self, key_bytes, record):
        fields = _unpack_record(record)
        if fields is None or fields.key != key_bytes:
            raise CorruptStoreError(
                f"the record of {key_bytes.decode('utf-8', 'replace')!r} in "
                f"{self._dat} is damaged", path=self._dat)
        return fields

    def _read_record(self, key_bytes):
        """Return key's current record, or raise KeyError.

        This is dbm.dumb's db[key] without its cost: that opens .dat anew on
        every call, which took two thirds of a read. We look up the same
        (offset, size) in dbm.dumb's index and read through our open handle.
        """
        pos, size = self._db._index[key_bytes]  # may raise KeyError
        self._reader.seek(pos)
        return self._reader.read(size)

    def _get(self, key_bytes):
        """Return the fields of key's current record, or None if it has none."""
        try:
            record = self._read_record(key_bytes)
        except KeyError:
            return None
        return self._check_record(key_bytes, record)

    def _get_live(self, key, key_bytes):
        fields = self._get(key_bytes)
        if fields is None or not _is_live(fields, self._clock()):
            raise KeyNotFoundError(f"key {key!r} not found", key=key, path=self.path)
        return fields

    def _growth(self, key_bytes, old, size):
        """Bytes .dat and .dir grow by if key is set to a record of `size` bytes.

        This mirrors dbm.dumb's __setitem__: a record that fits in the blocks
        of the old one is written over it; any other is appended to .dat, and a
        new key also appends a line to .dir. A moved key's line changes when
        .dir is rewritten at close, so that is counted now too.
        """
        if old is not None and _blocks(size) <= _blocks(old.size):
            return 0, 0
        pos = self._dat_size + (-self._dat_size % _BLOCK)
        return pos + size - self._dat_size, _index_line_size(key_bytes, pos, size)

    def _put(self, key_bytes, record, old, growth):
        """Write a record for key over `old`, its current record (or None);
        `growth` is what _growth says the files grow by."""
        dat_growth, dir_growth = growth
        self._db[key_bytes] = record
        self._dat_size += dat_growth
        self._dir_size += dir_growth
        if old is not None and old.kind == _VALUE and self._space is not None:
            self._space.add(old, sign=-1)

    # --- Space accounting and compaction ---

    def _start_accounting(self, space):
        """Take the file sizes; space None means "not counted yet"."""
        self._dat_size = os.path.getsize(self._dat)
        self._dir_size = os.path.getsize(self._dir)
        self._space = space

    def _records(self, now=None):
        """Yield (key, record, fields) for every record in the index, or with
        `now` for the live ones. Reads every record: O(keys)."""
        for key in self._db.keys():
            if key != _HEADER_KEY:
                record = self._read_record(key)
                fields = self._check_record(key, record)
                if now is None or _is_live(fields, now):
                    yield key, record, fields

    def _should_compact(self, growth, now):
        """Whether to compact before a create that grows the files by `growth`:
        if the create needs the room, or if half of .dat is dead.

        Compaction costs time in proportion to the live data, so it runs only
        once at least a sixteenth of max_bytes is reclaimable: averaged over
        the writes that made that garbage, the cost per write stays flat.
        """
        excess = self._dat_size + self._dir_size + sum(growth) - self.max_bytes
        if excess > 0 and self._space is None:  # once per open, when full
            self._space = _Space()
            for _, _, fields in self._records():
                if fields.kind == _VALUE:
                    self._space.add(fields)
        if self._space is None:
            return False  # nothing known to be dead, and the write fits
        dead = max(0, self._dat_size - self._space.live)
        threshold = self.max_bytes // 16
        if excess > 0:
            reclaimable = dead + self._space.expired(now)
            return reclaimable >= max(threshold, excess + _BLOCK)
        return dead >= threshold and 2 * dead >= self._dat_size

    def _compact(self):
        """Rewrite the live records into fresh files and switch to them."""
        space = self._write_fresh(self._records(self._clock()))
        # Closing makes dbm.dumb rewrite the old .dir: harmless, as the old
        # header says "open", so that .dir is never trusted.
        self._close_dbm()
        self._switch_to_fresh()
        self._db = self._open_dbm()
        _write_header(self._dat, _STATE_OPEN)
        self._start_accounting(space)

    def _write_fresh(self, records):
        """Write (key, record, fields) into path.compact.{dat,dir}, fsynced.

        The header of the new .dat says "closed" with the new .dir's size and
        CRC-32. Returns the _Space of what it wrote.
        """
        base = self._compact_base
        self._discard_fresh()
        space = _Space()
        try:
            db = dbm.dumb.open(base, "n", 0o600)
            try:
                db[_HEADER_KEY] = _pack_header(_STATE_OPEN)
                for key, record, fields in records:
                    db[key] = record
                    space.add(fields)
            finally:
                db.close()  # writes .compact.dir
            _remove(base + ".bak")
            _fsync_file(base + ".dir")
            dir_size, dir_crc = _size_and_crc(base + ".dir")
            _write_header(base + ".dat", _STATE_CLOSED, dir_size, dir_crc)
        except BaseException:
            self._discard_fresh()
            raise
        return space

    def _discard_fresh(self):
        """Delete unfinished fresh files. .dat goes last: while it exists, the
        next open knows the compaction did not commit; a lone .compact.dir
        would mean that it did."""
        base = self._compact_base
        _remove(base + ".dir", base + ".bak", base + ".dat")

    def _switch_to_fresh(self):
        """Make the fresh files the store's; the first rename is the commit."""
        base = self._compact_base
        _fsync_folder(self.path.parent)
        os.replace(base + ".dat", self._dat)
        os.replace(base + ".dir", self._dir)
        _remove(self._bak)
        _fsync_folder(self.path.parent)

    def _detach(self):
        """Drop the database without letting dbm.dumb write anything.

        dbm.dumb rewrites its index when closed or garbage-collected. Setting
        its index to None is how its own close() marks it closed, and makes
        that rewrite a no-op.
        """
        self._db._index = None
        self._db = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None


# --- Module-level functions on a default store ----------------------------

_default_store = None
_default_store_lock = threading.Lock()


def _default():
    global _default_store
    with _default_store_lock:
        if _default_store is None or _default_store._db is None:
            _default_store = DataStore()
        return _default_store


def create(key, value, ttl=None):
    """``DataStore.create`` on the default store (opened on first use)."""
    _default().create(key, value, ttl)


def read(key):
    """``DataStore.read`` on the default store (opened on first use)."""
    return _default().read(key)


def delete(key):
    """``DataStore.delete`` on the default store (opened on first use)."""
    _default().delete(key)


# --- Command line ---------------------------------------------------------

def main(argv=None):
    """``python datastore.py [--path PATH] create|read|delete ...``.

    Returns the exit status: 0 on success, 1 on an error (one line on
    stderr), 2 on a usage error (from argparse).
    """
    parser = argparse.ArgumentParser(
        prog="datastore", description="Create, read or delete a key in a store.")
    parser.add_argument("--path", help="the store (default: the default store "
                        "in your data folder)")
    commands = parser.add_subparsers(dest="command", required=True)
    create_parser = commands.add_parser("create", help="create KEY with a JSON object")
    create_parser.add_argument("key")
    create_parser.add_argument("json", help='a JSON object, e.g. \'{"a": 1}\'')
    create_parser.add_argument("--ttl", type=int, metavar="SECONDS",
                               help="delete the key after this many seconds")
    commands.add_parser("read", help="print KEY's JSON object").add_argument("key")
    commands.add_parser("delete", help="delete KEY").add_argument("key")
    args = parser.parse_args(argv)
    try:
        if args.command == "create":
            try:
                value = json.loads(args.json)
            except ValueError as exc:
                raise InvalidValueError(f"JSON for {args.key!r} is not valid: {exc}",
                                        key=args.key) from None
        with DataStore(args.path) as store:
            if args.command == "create":
                store.create(args.key, value, ttl=args.ttl)
            elif args.command == "read":
                print(json.dumps(store.read(args.key), ensure_ascii=False))
            else:
                store.delete(args.key)
    except (DataStoreError, OSError) as exc:
        print(f"datastore: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
