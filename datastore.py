"""A small persistent key-value store in one file, for one process at a time.

    >>> import tempfile
    >>> from datastore import DataStore
    >>> with tempfile.TemporaryDirectory() as folder, DataStore(folder + "/people") as store:
    ...     store.create("ada", {"born": 1815, "known for": "the first program"})
    ...     store.read("ada")["born"]
    1815

Copy ``datastore.py`` into your project (its only dependency is ``fasteners``),
or install the package ``datastore-kv``; either way, ``import datastore``.
The interface::

    store = DataStore(path=None, *, max_bytes=MAX_STORE_BYTES, timeout=0)
    store.create(key, value, ttl=None)  # a new key only
    store.set(key, value, ttl=None)     # a new key, or replace a live one
    store.read(key)                     # a new dict; KeyNotFoundError if missing
    store.get(key, default=None)
    store.delete(key)
    store.ttl(key)                      # seconds left, or None
    key in store, len(store), store.keys(), iter(store)
    store.compact(), store.sync(), store.check(), store.close()   # or: with
    datastore.create/set/read/get/delete/keys/ttl/close(...)     # default store

Guarantees
----------
* Keys are ``str`` of 1 to 32 characters; values are ``dict`` objects of at most
  16 KiB as compact UTF-8 JSON, and ``read`` returns a dict equal to the one
  stored (values JSON would change, such as tuples or non-string keys, and
  nesting deeper than ``MAX_VALUE_DEPTH`` levels, are refused). ``create``
  never overwrites a live key; ``set`` replaces one atomically.
* A key created with ``ttl=N`` expires N seconds after the clock reading the
  create takes just before it writes (wall-clock time, ``time.time()``); from
  then on it is gone for ``read`` and ``delete`` and may be created again.
* The store's files never add up to more than ``max_bytes`` (1 GiB by
  default), at any instant, and the space of deleted and expired values is
  used again by the next write that needs it.
* Every call costs about the same however many keys the store holds: no call
  but opening, closing and ``compact()`` does work in proportion to the store.
* Every operation that returned is in the files: killing the process at any
  instant loses nothing that returned, and the operation that was running is
  either wholly done or not done at all. ``sync()`` and ``close()`` also
  fsync, so what they cover survives a power cut.
* One process at a time may open a store; any number of its threads may use
  it. A child made by ``fork()`` cannot use its parent's store object. A store
  that is garbage collected, or still open at exit, is closed cleanly.
* Every error is a ``DataStoreError`` (or, for the operating system's own
  failures such as a full disk, the ``OSError`` it raised), and a call that
  raises changes nothing a later call could observe.

Limits
------
* Keys and values are read from disk on every call and never cached. The
  index is a file, ``path.idx``, mapped into memory: the process holds a few
  bytes a key of its own (16 for a key with a ttl).
* A clean open reads the headers and what the last close appended to
  ``path.idx``; after a crash it scans the whole ``.dat`` and rebuilds it.
* A store holds two locks while open: ``fasteners``' record lock on
  ``path.lock`` and an ``flock`` on ``path.dat`` (POSIX), so that deleting
  ``path.lock`` does not let a second process in. Neither works on network
  file systems. See the README for the traps of each and how they are met.

How it is built
---------------
One module per concern, each readable alone, in the order the copy-in file
``datastore.py`` holds them: ``errors`` (the exceptions), ``codec`` (checking
keys, values and ttls), ``format`` (the data file, field by field), ``space``
(free extents and expiries), ``index`` (the hash table in ``path.idx``),
``locks`` (one process per store), ``snapshot`` (what a clean close leaves
for a fast open), ``recovery`` (the scan after a crash), ``legacy``
(converting 1.0 stores), ``compaction`` (moving records down, and
``compact()``), ``opening`` (from the files to a loaded store), ``engine``
(how each call changes the files), ``store`` (``DataStore`` and the default
store) and ``cli`` (the command line, with ``export`` and ``import``).

Generated from the package src/datastore by tools/single_file.py: edit those
modules, not this file, then run the script.
"""


from __future__ import annotations


import argparse
from array import array
from bisect import bisect_left, bisect_right
from collections import Counter, deque
import contextlib
from contextlib import suppress
import errno
import functools
import gc
import glob
import io
from itertools import chain, compress, repeat
import json
from json.scanner import make_scanner
import logging
import math
import mmap
from operator import add, and_, lshift, lt, or_, rshift
import os
from pathlib import Path
import re
import stat
import struct
import sys
import tempfile
import threading
import time
from typing import (
    Any, BinaryIO, Callable, Iterable, Iterator, Optional, Sequence, Tuple,
    TypeVar, cast,
)
import weakref
import zlib

import fasteners  # type: ignore[import-untyped]  # it ships no type hints


__version__ = "4.0.0"
__all__ = [
    "DataStore", "create", "read", "delete", "get", "keys", "ttl", "close",
    "MAX_KEY_LENGTH", "MAX_VALUE_BYTES", "MAX_VALUE_DEPTH", "MAX_STORE_BYTES",
    "MIN_STORE_BYTES",
    "DataStoreError", "DataStoreTypeError", "DataStoreValueError",
    "KeyTypeError", "InvalidKeyError", "ValueTypeError", "InvalidValueError",
    "TTLTypeError", "InvalidTTLError", "KeyExistsError", "KeyNotFoundError",
    "StoreFullError", "StoreLockedError", "StoreClosedError",
    "StoreForkedError", "CorruptStoreError",
]
# datastore.set is there too, but not in __all__: `from datastore import *`
# must not hide the builtin set.


# --- errors.py ---------------------------------------------------------------
# The exceptions: one hierarchy rooted at DataStoreError.
#
# Each error a user can meet subclasses the builtin a caller would naturally
# catch (``KeyNotFoundError`` is a ``KeyError``, the argument errors are
# ``TypeError`` or ``ValueError``), carries the ``key`` and ``path`` it is
# about, and pickles. The operating system's own failures (a full disk, a
# folder you may not write) stay the ``OSError`` they are.
#
# Two private exceptions are the engine's signals to the facade, which turns
# them into the public errors with messages that name the store; ``_unit``
# marks the engine's writes, so that one cut short by any other exception is
# known.

# Recovery reports damage here, and upkeep its retried failures. The library
# configures no handlers.
_log = logging.getLogger("datastore")


class DataStoreError(Exception):
    """Base of every error this module raises.

    ``key`` and ``path``, where they apply, name the key and the store.
    """

    def __init__(self, message: str, *, key: Optional[str] = None,
                 path: Any = None) -> None:
        super().__init__(message)
        self.key = key
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> Any:
        return _rebuild_error, (type(self), str(self), self.key, self.path)


def _rebuild_error(cls: type, message: str, key: Optional[str], path: Any) -> Any:
    return cls(message, key=key, path=path)


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
    """The write would take the store's files over ``max_bytes`` (or, at
    open, the store already needs more than the ``max_bytes`` given)."""


class StoreLockedError(DataStoreError):
    """The store is open elsewhere: in another process, or in this one."""


class StoreClosedError(DataStoreError):
    """The store was closed."""


class StoreForkedError(DataStoreError):
    """The store was opened by another process, which this one was forked from."""


class CorruptStoreError(DataStoreError):
    """A store file is damaged or is not a store file."""



if __name__.endswith(".errors"):  # in the package: named, shown and pickled as datastore.X
    for _public in (DataStoreError, DataStoreTypeError, DataStoreValueError, KeyTypeError,
                    InvalidKeyError, ValueTypeError, InvalidValueError, TTLTypeError,
                    InvalidTTLError, KeyExistsError, KeyNotFoundError, StoreFullError,
                    StoreLockedError, StoreClosedError, StoreForkedError, CorruptStoreError,
                    _rebuild_error):  # (which pickles name: the copy-in file has it too)
        _public.__module__ = __name__[:-len(".errors")]


def _damaged(path: str, detail: str) -> CorruptStoreError:
    return CorruptStoreError(f"{path} is damaged: {detail}; move the store "
                             "away and restore a backup", path=path)


class _Locked(Exception):
    """Another process holds the data file's lock. (DataStore says so.)"""


class _StoreFull(Exception):
    """A write would take the files over max_bytes. (The engine's own signal:
    DataStore turns it into StoreFullError.)"""

    def __init__(self, needed: int, used: int, reason: str = "") -> None:
        super().__init__(needed, used)
        self.needed, self.used, self.reason = needed, used, reason


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _unit(method: _Method) -> _Method:
    """A write that leaves memory matching the files when it ends, however
    it ends: `busy` is set while it runs and cleared when it returns or
    raises one of its own errors (OSError, _StoreFull), whose paths keep the
    two in step. Anything else that cuts it short (KeyboardInterrupt, or
    SystemExit from a signal handler, between any two statements) leaves
    `busy` set, and the store reads its files again, as after a crash,
    before it does anything more (DataStore._usable). First it calls
    `_changing()`: close() then has a snapshot to write."""
    @functools.wraps(method)
    def run(self: Any, *args: Any) -> Any:
        if not self.changed:
            self._changing()  # (may raise OSError: then no key has changed)
        self.busy = True
        try:
            result = method(self, *args)
        except (OSError, _StoreFull):
            self.busy = False
            raise
        self.busy = False
        return result
    return cast(_Method, run)


# --- codec.py ----------------------------------------------------------------
# Checking and encoding what users pass: keys, values and ttls.
#
# A key is a ``str`` of 1 to ``MAX_KEY_LENGTH`` characters, stored as UTF-8.
# A value is a ``dict`` of plain JSON, stored as compact UTF-8 JSON of at most
# ``MAX_VALUE_BYTES``. A ttl is a whole number of seconds, stored as the
# ``time.time()`` at which the key expires. Each check raises the error from
# ``errors`` that names what is wrong.

MAX_KEY_LENGTH = 32             # characters (code points)
MAX_VALUE_BYTES = 16 * 1024     # compact UTF-8 JSON
MAX_VALUE_DEPTH = 100           # dicts and lists nested in a value, the value included

# The latest expiry we accept: 9999-12-31 23:59:59 UTC, the end of datetime.
_LATEST_EXPIRY = 253402300799


def _encode_key(key: object) -> tuple[str, bytes]:
    """Return the key as a plain str and as UTF-8, or raise if it is not valid.

    A str subclass is copied first (str.__str__), so that no method it
    overrides (__len__, encode, __eq__) takes part in the checks.
    """
    if type(key) is not str:
        if not isinstance(key, str):
            raise KeyTypeError(f"key must be a str, not {type(key).__name__}")
        key = str.__str__(key)
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise InvalidKeyError(
            f"key must be 1 to {MAX_KEY_LENGTH} characters, "
            f"got {len(key)}: {key!r}", key=key)
    try:
        return key, key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(f"key {key!r} cannot be encoded as UTF-8: {exc.reason}",
                              key=key) from None


# Compact JSON, UTF-8 left as it is. One encoder for every call: building one
# is a quarter of json.dumps's time, and encode() keeps no state between calls.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False)
# encode() itself builds the C encoder afresh at every call, 0.5 µs of its
# 1.2: it is built once here, with the same settings (where there is one).
_C_MAKE_ENCODER = getattr(json.encoder, "c_make_encoder", None)  # (not in typeshed)
_C_ENCODE = None if _C_MAKE_ENCODER is None else _C_MAKE_ENCODER(
    None, _JSON.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)


def _json_text(value: Any) -> str:
    """_JSON.encode(value), of a plain value (see _is_plain)."""
    return "".join(_C_ENCODE(value, 0)) if _C_ENCODE else _JSON.encode(value)


class _NotPlain(Exception):
    """What makes a value not plain JSON (see _plain)."""


def _plain(value: object, depth: int) -> Any:
    """A copy of `value` made only of dict, list, str, int, float, bool and
    None, or raise _NotPlain.

    It refuses what JSON would change (tuples, non-str keys, NaN), so that
    read() returns an equal value, and nesting deeper than MAX_VALUE_DEPTH,
    which json.loads may not return when called a few frames deep. Subclasses
    are read through their base type's own methods (dict.items, str.__str__,
    ...), so nothing they override decides what is stored.
    """
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if isinstance(value, float):
        number = float.__float__(value)
        if number != number or number in (float("inf"), float("-inf")):
            raise _NotPlain(f"{number} is not a JSON number")
        return number
    if isinstance(value, (dict, list)):
        if depth >= MAX_VALUE_DEPTH:
            raise _NotPlain(f"it is nested more than {MAX_VALUE_DEPTH} levels deep "
                            "(or refers to itself)")
        if isinstance(value, list):
            return [_plain(item, depth + 1) for item in list.__iter__(value)]
        copy = {}
        for name, item in dict.items(value):
            if not isinstance(name, str):
                raise _NotPlain(f"key {name!r} is not a str (JSON would make it one)")
            copy[str.__str__(name)] = _plain(item, depth + 1)
        return copy
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):  # but not bool, which cannot be subclassed
        return int.__int__(value)
    raise _NotPlain(f"a {kind.__name__} is not JSON" + (
        " (use a list: JSON would make it one)" if isinstance(value, tuple) else ""))


def _is_plain(value: object, depth: int) -> bool:
    """Whether `value` holds only the exact types dict (with str keys), list,
    str, int, finite float, bool and None, nested at most MAX_VALUE_DEPTH
    levels: then JSON writes it as it is and read() returns an equal value,
    with no copy made. Anything else goes through _plain, which copies what
    it can and says what it cannot. (Scalars are checked in the loops, not
    by a call each: most of a value is scalars.)"""
    if depth >= MAX_VALUE_DEPTH:
        return False
    if type(value) is dict:
        items: Iterable[tuple[object, object]] = value.items()
    elif type(value) is list:
        items = enumerate(value)
    else:
        return False
    for name, item in items:
        if type(name) is not str and type(value) is dict:
            return False
        scalar = type(item)
        if scalar is str or scalar is int or scalar is bool or item is None:
            continue
        if scalar is float:
            if not math.isfinite(item):  # type: ignore[arg-type]  # (a float: checked)
                return False
        elif not _is_plain(item, depth + 1):
            return False
    return True


def _encode_value(key: str, value: object) -> bytes:
    """Return the value as compact UTF-8 JSON, or raise if it is not storable."""
    if not isinstance(value, dict):
        raise ValueTypeError(
            f"value for {key!r} must be a dict, not {type(value).__name__}", key=key)
    try:
        body = _json_text(value if _is_plain(value, 0) else _plain(value, 0)).encode("utf-8")
    except (_NotPlain, UnicodeEncodeError) as exc:
        reason = exc.reason if isinstance(exc, UnicodeEncodeError) else exc
        raise InvalidValueError(f"value for {key!r} is not plain JSON: {reason}",
                                key=key) from None
    except ValueError as exc:  # an int longer than sys.get_int_max_str_digits()
        raise InvalidValueError(f"value for {key!r} cannot be written as JSON: {exc}",
                                key=key) from None
    if len(body) > MAX_VALUE_BYTES:
        raise InvalidValueError(
            f"value for {key!r} is {len(body)} bytes as JSON; "
            f"the limit is {MAX_VALUE_BYTES}", key=key)
    return body


def _expiry(key: str, ttl: object, now: float) -> float:
    """Return expires_at for a ttl given at time `now` (0.0 for never)."""
    if ttl is None:
        return 0.0
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
    return now + ttl

# json.loads(text) is this scanner's call behind three layers of Python (a
# type check, a whitespace match, raw_decode), a third of a read's decoding.
_SCAN: Callable[[str, int], tuple[Any, int]] = make_scanner(
    json.JSONDecoder())  # type: ignore[arg-type]  # (typeshed: the class, not its call)


def _decode_object(body: bytes) -> Optional[dict[str, Any]]:
    """A record's body as the dict read() returns, or None if it is not a
    JSON object (a CRC-valid record that is not ours). As json.loads reads
    it; the scanner alone reads the compact JSON that create writes."""
    try:
        text = body.decode("utf-8")
        try:
            value, end = _SCAN(text, 0)
        except StopIteration:  # (at 0: leading whitespace, say)
            end = -1
        if end != len(text):
            value = json.loads(text)
    except (ValueError, RecursionError):  # (UnicodeDecodeError too)
        return None
    return value if type(value) is dict else None


# --- format.py ---------------------------------------------------------------
# The on-disk format: each structure described once, field by field, with
# one function that packs it and one that checks and unpacks it.
#
# A store named ``path`` is ``path.dat`` (the records: the truth),
# ``path.idx`` (the index: where each key's record is, see ``index``) and
# ``path.lock`` (for the inter-process lock, which holds no data). Version 2
# kept a ``dbm.dumb``-readable ``path.dir`` instead of ``path.idx``; it cost
# 30 bytes a key and a write of every key at each close, and is gone:
# ``datastore export`` gives a store's content as JSON Lines.
#
# ``.dat`` is a sequence of 64-byte blocks. Block 0 holds the *header*
# (``_HEADER``, little-endian, 48 bytes, within one disk sector)::
#
#     magic "DataStr4"   8 bytes ("DataStr3", "DataStr2": versions 3 and 2,
#                        converted at open, see legacy)
#     state              1 byte: 0 closed cleanly, 1 open (or killed while open)
#     (zero)             3 bytes
#     sequence number    8 bytes: closed, the next one to issue; open, a bound
#                        that every number issued while open stays below
#     stamp              8 bytes: closed, a random number the clean close wrote
#                        into .idx too (see snapshot); open, 0
#     (zero)             16 bytes
#     CRC-32             4 bytes, of the fields before it
#
# Every other block is the first block of a *record*, a block inside one, or
# free space. A record starts at a block boundary and describes itself with a
# 32-byte *head* (``_HEAD``, little-endian)::
#
#     magic              4 bytes: 0xFF, then "DSr"
#     kind               1 byte: 1 value, 2 free marker
#     key length         1 byte: UTF-8 bytes of the key (0 for kind 2)
#     (zero)             2 bytes
#     sequence number    8 bytes: which of two copies of a key is newer
#     expires_at         8 bytes: the bits of a float64 time.time() value,
#                        0 for never (kind 2: 0)
#     length             4 bytes: kind 1, bytes of the body; kind 2, blocks of
#                        free space that start here
#     CRC-32             4 bytes, of the head before it, the key and the body
#
# * kind 1, a *value*: the key (UTF-8) and the body (the value as compact
#   JSON, UTF-8) follow the head.
# * kind 2, a *free marker*: nothing follows the head.
#
# The magic starts with the byte 0xFF, which UTF-8 never contains: so nothing
# a user stores, a key or a value, can look like a head at a block boundary,
# however its bytes fall across blocks.
#
# The engine describes a record by a *slot*, one int (see ``_slot``): record
# size in bytes (16 bits) | block (32 bits) << 16 | expires_at bits << 48.
# The index stores the low 48 bits, the *place*; the expiry is in the
# record's head. The bits of non-negative floats order as the floats do, so
# expiries compare directly as ints.

# Records start at multiples of this many bytes (2 ** _BLOCK_BITS).
_BLOCK, _BLOCK_BITS = 64, 6
# A record's head, and the same without the CRC that covers it.
_HEAD = struct.Struct("<4sBBHQQII")
_FIELDS = struct.Struct("<4sBBHQQI")
_MAGIC = b"\xffDSr"
_VALUE, _FREE = 1, 2
_MAX_KEY_BYTES = 4 * MAX_KEY_LENGTH
_MAX_RECORD = _HEAD.size + _MAX_KEY_BYTES + MAX_VALUE_BYTES
_MAX_BLOCKS = -(-_MAX_RECORD // _BLOCK)  # 259
_MAX_SEQ = 1 << 62  # larger sequence numbers in a file are damage (they would overflow)
# The largest max_bytes: block numbers and free-marker lengths fit 32 bits.
_LARGEST_STORE = 1 << 38

_HEADER = struct.Struct("<8sB3xQQ16xI")
_HEADER_MAGICS = {b"DataStr4": 4, b"DataStr3": 3, b"DataStr2": 2}  # -> version
_HEADER_MAGIC = b"DataStr4"
_CLOSED, _OPEN = 0, 1
_LEASE = 1 << 20  # sequence numbers issued while open per write of the header's bound

# The index's slots (see the module docstring).
_SIZE_MASK = 0xFFFF
_BLOCK_SHIFT, _BLOCK_MASK = 16, 0xFFFFFFFF
_EXP_SHIFT = 48
_SLOT_MASK = (1 << _EXP_SHIFT) - 1  # size and block, without the expiry
_FLOAT = struct.Struct("<d")
_BITS = struct.Struct("<Q")
_LATEST_EXPIRY_BITS = struct.unpack("<Q", struct.pack("<d", _LATEST_EXPIRY))[0]


# --- Blocks, slots and expiries -------------------------------------------

def _blocks(size: int) -> int:
    """Blocks that `size` bytes take."""
    return -(-size // _BLOCK)


def _slot(size: int, block: int, exp: int = 0) -> int:
    return size | block << _BLOCK_SHIFT | exp << _EXP_SHIFT


def _slot_size(slot: int) -> int:
    return slot & _SIZE_MASK


def _slot_block(slot: int) -> int:
    return slot >> _BLOCK_SHIFT & _BLOCK_MASK


def _slot_exp(slot: int) -> int:
    """The expiry's float bits, 0 for never."""
    return slot >> _EXP_SHIFT


def _float_bits(value: float) -> int:
    return int(_BITS.unpack(_FLOAT.pack(value))[0])


def _bits_float(bits: int) -> float:
    return float(_FLOAT.unpack(_BITS.pack(bits))[0])


# --- Records --------------------------------------------------------------

def _pack_value(seq: int, key: bytes, exp: int, body: bytes) -> bytes:
    fields = _FIELDS.pack(_MAGIC, _VALUE, len(key), 0, seq, exp, len(body))
    crc = zlib.crc32(body, zlib.crc32(key, zlib.crc32(fields)))
    return b"".join((fields, crc.to_bytes(4, "little"), key, body))


def _free_marker(length: int) -> bytes:
    """A free marker of `length` blocks (packed once, for the lengths of a record)."""
    return _FREE_MARKERS[length] if length <= _MAX_BLOCKS else _pack_marker(length)


def _pack_marker(length: int) -> bytes:
    fields = _FIELDS.pack(_MAGIC, _FREE, 0, 0, 0, 0, length)
    return fields + zlib.crc32(fields).to_bytes(4, "little")


_FREE_MARKERS = tuple(_pack_marker(length) for length in range(_MAX_BLOCKS + 1))


# (kind, seq, key, expiry bits, length, total bytes): see _parse_item
_Item = Tuple[int, int, bytes, int, int, int]


def _parse_item(buf: bytes, off: int, magic: bytes = _MAGIC) -> Optional[_Item]:
    """The valid record or free marker at buf[off:], or None.

    Returns (kind, seq, key, expiry bits, length, total bytes). (The scan in
    recovery makes the same checks in bulk; a test holds the two to the same
    answers. Versions 2 and 3 wrote the same heads under another magic: see
    legacy.)
    """
    if len(buf) - off < _HEAD.size:
        return None
    found, kind, key_len, zero, seq, exp, length, crc = _HEAD.unpack_from(buf, off)
    if found != magic or zero or exp > _LATEST_EXPIRY_BITS or seq >= _MAX_SEQ:
        return None
    if kind == _VALUE:
        if not 0 < key_len <= _MAX_KEY_BYTES or length > MAX_VALUE_BYTES:
            return None
        total = _HEAD.size + key_len + length
    elif kind == _FREE and not key_len and length:
        total = _HEAD.size
    else:
        return None
    end = off + total
    if end > len(buf) or zlib.crc32(buf[off + _HEAD.size:end],
                                    zlib.crc32(buf[off:off + _HEAD.size - 4])) != crc:
        return None
    return kind, seq, buf[off + _HEAD.size:off + _HEAD.size + key_len], exp, length, total


def _with_seq(record: bytes, seq: int) -> bytes:
    """A copy of a valid value record with another sequence number."""
    fields = record[:8] + seq.to_bytes(8, "little") + record[16:_FIELDS.size]
    crc = zlib.crc32(record[_HEAD.size:], zlib.crc32(fields))
    return fields + crc.to_bytes(4, "little") + record[_HEAD.size:]


def _value_body(record: bytes, key: bytes) -> Optional[bytes]:
    """The body of `record` if it is a whole, valid value record of `key`."""
    item = _parse_item(record, 0)
    if item is None or item[0] != _VALUE or item[2] != key or item[5] != len(record):
        return None
    return record[_HEAD.size + len(key):]


def _valid_key(key: bytes) -> bool:
    try:
        return 1 <= len(key.decode("utf-8")) <= MAX_KEY_LENGTH
    except UnicodeDecodeError:
        return False


def _valid_keys(keys: list[bytes]) -> bool:
    """Whether every key is UTF-8 of 1 to MAX_KEY_LENGTH characters, checked
    in bulk: joined by newlines, which can neither end nor continue a UTF-8
    character, the keys decode if and only if each one does."""
    if not keys:
        return True
    if min(map(len, keys)) < 1:
        return False
    try:
        b"\n".join(keys).decode("utf-8")
    except UnicodeDecodeError:
        return False
    return max(map(len, keys)) <= MAX_KEY_LENGTH or all(
        _valid_key(key) for key in keys if len(key) > MAX_KEY_LENGTH)


# --- The header -----------------------------------------------------------

def _pack_header(state: int, seq: int, stamp: int = 0) -> bytes:
    fields = _HEADER.pack(_HEADER_MAGIC, state, seq, stamp, 0)
    return fields[:-4] + zlib.crc32(fields[:-4]).to_bytes(4, "little")


class _Header:
    """The fields of a valid header (of version 4, 3 or 2: see `version`)."""

    def __init__(self, data: bytes) -> None:
        magic, self.state, self.seq, self.stamp, _ = _HEADER.unpack(data)
        self.version = _HEADER_MAGICS[magic]

    @staticmethod
    def parse(data: bytes) -> Optional[_Header]:
        if (len(data) < _HEADER.size or data[:8] not in _HEADER_MAGICS
                or zlib.crc32(data[:_HEADER.size - 4])
                != int.from_bytes(data[_HEADER.size - 4:_HEADER.size], "little")):
            return None
        header = _Header(data[:_HEADER.size])
        return header if header.state in (_CLOSED, _OPEN) and header.seq < _MAX_SEQ else None


def _item_before(fd: int, end: int) -> Optional[tuple[int, bytes, _Item]]:
    """(block, buffer from that block on, _parse_item's fields) of the last
    valid item that starts within _MAX_BLOCKS blocks before block `end` of
    .dat, or None. (It may end before `end`: the caller checks.)"""
    if end <= 1:
        return None
    first, buf = end - 1, _read_at(fd, _BLOCK, (end - 1) * _BLOCK)
    item = _parse_item(buf, 0)  # most records take one block
    if item is None:
        first = max(1, end - _MAX_BLOCKS)
        buf = _read_at(fd, (end - first) * _BLOCK, first * _BLOCK)
        off = len(buf)
        while item is None and off > 0:
            off = buf.rfind(_MAGIC, 0, off)
            if off < 0:
                return None
            if off % _BLOCK == 0:  # else: the magic inside a value's text
                item = _parse_item(buf, off)
        buf, first = buf[off:], first + off // _BLOCK
    return None if item is None else (first, buf, item)


# --- Files ----------------------------------------------------------------

def _open_regular(path: str) -> io.FileIO:
    """A regular file (created, private, if missing) open for reading and
    writing, for the store's life. Anything else (a folder, a FIFO, a
    device) is refused before a byte is read. A file object, not a bare
    descriptor: if an interrupt comes between opening it and handing it
    over, it closes as it is dropped, and no lock stays behind."""
    try:
        _new_file(path, b"")
    except FileExistsError:
        pass
    try:
        file = io.FileIO(path, "r+")
    except IsADirectoryError:
        raise CorruptStoreError(f"{path} is a folder, not a store file; move it away",
                                path=path) from None
    if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
        file.close()
        raise CorruptStoreError(f"{path} is not a regular file; move it away", path=path)
    return file


def _new_file(path: str, data: bytes) -> None:
    """Make `path` (which must not exist), readable by its owner only,
    holding `data`, fsynced if there is any."""
    with io.FileIO(path, "x") as file:
        os.chmod(path, 0o600)
        if data:
            _write_at(file.fileno(), data, 0)
            _fsync(file.fileno())


def _create_data_file(path: str, idx_path: str) -> None:
    """Make `path` a new store's .dat, holding only a valid header, unless
    it exists already. The header is written under a temporary name and
    fsynced before the file takes its name, and the folder is fsynced after:
    so a power cut leaves either no .dat or one with a valid header, never
    an empty or torn one that the next open would refuse as foreign. An
    index file that holds anything says the .dat was lost, not never made:
    that is refused."""
    if os.path.exists(idx_path) and (not os.path.isfile(idx_path)
                                     or os.path.getsize(idx_path)):
        raise CorruptStoreError(f"{idx_path} exists but {path} is missing; restore "
                                "the data file or move the index away", path=idx_path)
    temp = f"{path}.{os.getpid()}.new"
    _remove(temp)  # of a creator that had this process's number before
    try:
        _new_file(temp, _pack_header(_CLOSED, 1))
        try:
            os.link(temp, path)  # never over a .dat another opener made meanwhile
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno not in _NO_HARD_LINKS:
                raise
            try:
                _new_file(path, _pack_header(_CLOSED, 1))  # in place, then
            except FileExistsError:
                pass
    finally:
        _remove(temp)
    _fsync_folder(os.path.dirname(path))


# What os.link raises on a file system without hard links (FAT, some FUSE
# ones): then the new .dat is made in place instead, with O_EXCL.
_NO_HARD_LINKS = frozenset((errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK))


def _fsync_folder(folder: str) -> None:
    """Make the names in `folder` durable (where folders can be opened)."""
    if sys.platform == "win32":
        return
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        _fsync(fd)
    finally:
        os.close(fd)


def _remove(*paths: str) -> None:
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _write_at(fd: int, data: bytes, pos: int) -> None:
    """Write all of data at pos (seek and write where there is no pwrite)."""
    written = 0
    if hasattr(os, "pwrite"):
        written = os.pwrite(fd, data, pos)  # whole, nearly always
        if written == len(data):
            return
    view = memoryview(data)[written:]
    pos += written
    while view:
        if hasattr(os, "pwrite"):
            written = os.pwrite(fd, view, pos)
        else:  # Windows: the caller holds the store's lock, so no one moves the offset
            os.lseek(fd, pos, os.SEEK_SET)
            written = os.write(fd, view)
        view = view[written:]
        pos += written


def _read_at(fd: int, size: int, pos: int) -> bytes:
    """Read up to size bytes at pos: fewer only at the end of the file."""
    if hasattr(os, "pread"):
        data = os.pread(fd, size, pos)
    else:  # Windows: the caller holds the store's lock, so no one moves the offset
        os.lseek(fd, pos, os.SEEK_SET)
        data = os.read(fd, size)
    if 0 < len(data) < size:  # a short read, which a regular file rarely gives
        more = _read_at(fd, size - len(data), pos + len(data))
        data += more
    return data


def _fsync(fd: int) -> None:
    """Make fd's writes durable. On macOS, fsync only reaches the drive's
    cache; F_FULLFSYNC asks the drive to write it (where the file system
    supports it)."""
    if sys.platform == "darwin":
        import fcntl  # POSIX only, so imported where it is used
        try:
            fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
            return
        except OSError:
            pass
    os.fsync(fd)


# --- space.py ----------------------------------------------------------------
# Free space and expiries: the two orders the engine keeps in memory.
#
# ``_FreeSpace`` holds the free extents of ``.dat`` (runs of blocks no record
# holds), merged with their free neighbours, findable by start, by end and by
# length, in about a byte a block of ``.dat`` and 8 bytes an extent.
# ``_Expiries`` holds the records that have a ttl (by their place, see
# format), in order of expiry.
# Neither does I/O: the engine writes the free markers and records first, then
# tells these.

# A free extent's key in _FreeSpace.by_size: its length (up to _MAX_BLOCKS;
# _LONG for any longer, all of which fit any record) above its start block.
_LONG = _MAX_BLOCKS + 1
_START_BITS = 32
_START_MASK = (1 << _START_BITS) - 1
_LIES = 64  # keys loaded that do not match the map, dropped by one fitting()


def _key(length: int, start: int) -> int:
    """The key in _FreeSpace.by_size of an extent of `length` blocks at `start`."""
    return min(length, _LONG) << _START_BITS | start


class _Sorted:
    """A sorted set of ints below 2**64, in runs of at most 2 * _RUN: adding
    or removing one is a bisection over the runs' first values, one within
    its run, and a short memmove. 8 bytes a value."""

    _RUN = 512

    def __init__(self) -> None:
        self.firsts = array("Q")          # each run's first value
        self.runs: list[array[int]] = []  # ascending, each run above the one before
        self.count = 0

    def _run(self, value: int) -> int:
        return max(bisect_right(self.firsts, value) - 1, 0)

    def add(self, value: int) -> None:
        if not self.runs:
            self.firsts.append(value)
            self.runs.append(array("Q", [value]))
        else:
            i = self._run(value)
            run = self.runs[i]
            j = bisect_left(run, value)
            run.insert(j, value)
            if j == 0:
                self.firsts[i] = value
            if len(run) > 2 * self._RUN:
                self.runs.insert(i + 1, run[self._RUN:])
                self.firsts.insert(i + 1, run[self._RUN])
                del run[self._RUN:]
        self.count += 1

    def discard(self, value: int) -> bool:
        """Take `value` out, if it is there; returns whether it was."""
        i = self._run(value)
        run = self.runs[i] if self.runs else array("Q")
        j = bisect_left(run, value)
        if j == len(run) or run[j] != value:
            return False
        del run[j]
        if not run:
            del self.runs[i], self.firsts[i]
        elif j == 0:
            self.firsts[i] = run[0]
        self.count -= 1
        return True

    def load(self, values: array[int]) -> None:
        """Fill an empty instance with `values`, ascending."""
        self.runs = [values[at:at + self._RUN] for at in range(0, len(values), self._RUN)]
        self.firsts = array("Q", [run[0] for run in self.runs])
        self.count = len(values)

    def dump(self) -> array[int]:
        """Every value, ascending (for load)."""
        return array("Q", chain.from_iterable(self.runs))

    def first_from(self, value: int) -> Optional[int]:
        """The least value held that is at least `value`, or None."""
        if not self.runs:
            return None
        i = self._run(value)
        run = self.runs[i]
        j = bisect_left(run, value)
        if j < len(run):
            return int(run[j])
        return int(self.runs[i + 1][0]) if i + 1 < len(self.runs) else None


class _FreeSpace:
    """The free extents of .dat: maximal runs of blocks no record holds,
    as (start block, length in blocks).

    ``map`` has a byte a block of .dat, 1 if it is free: the extent that
    starts or ends at a block is found by a scan of it (find and rfind, in
    C), and neighbours merge by it. ``by_size`` holds each extent's key (its
    length, or _LONG, above its start), so the first key at or above
    ``blocks << 32`` is a smallest extent that fits, the lowest of them.
    About a byte a block and 8 bytes a free extent, however fragmented; and
    both are saved and loaded whole (see snapshot), not extent by extent.

    ``map`` decides what is free. A key that does not match it (only a
    loaded one can: see load) is dropped when the best fit finds it, and a
    close then saves keys made from the map (as it does if there are not
    one a run). One never found only keeps its run's blocks from reuse.
    """

    def __init__(self) -> None:
        self.map = bytearray()   # a byte a block: 1 free, 0 held (or past the end)
        self.by_size = _Sorted()
        self.blocks = 0          # free blocks in all
        self.lied = False        # some key loaded did not match the map

    def _end(self, block: int) -> int:
        """The first block at or after `block` that is not free."""
        end = self.map.find(0, block)
        return len(self.map) if end < 0 else end

    def length_at(self, start: int) -> Optional[int]:
        """The length of the extent that starts at `start`, or None."""
        free = self.map
        if start < len(free) and free[start] and not (start and free[start - 1]):
            return self._end(start) - start
        return None

    def start_before(self, end: int) -> Optional[int]:
        """The start of the extent that ends at block `end`, or None."""
        free = self.map
        if 0 < end <= len(free) and free[end - 1] and (end == len(free) or not free[end]):
            return free.rfind(0, 0, end) + 1
        return None

    def add(self, start: int, length: int) -> None:
        """Count blocks [start, start + length) free (none of them is yet),
        merged with free neighbours."""
        free, end = self.map, start + length
        if end > len(free):
            free.extend(bytes(end - len(free)))
        first, last, merged = start, end, []  # (the keys of the neighbours merged)
        if start and free[start - 1]:
            first = free.rfind(0, 0, start) + 1
            merged.append(_key(start - first, first))
        if end < len(free) and free[end]:
            last = self._end(end)
            merged.append(_key(last - end, end))
        free[start:end] = b"\1" * length
        key = _key(last - first, first)
        for old in merged:
            if old != key:  # (a long extent before keeps its key)
                self.by_size.discard(old)
        if key not in merged:
            self.by_size.add(key)
        self.blocks += length

    def remove(self, start: int) -> int:
        """Take the extent that starts at `start` out; return its length."""
        length = self.length_at(start)
        if length is None:
            raise KeyError(start)  # no extent starts there: a bug
        self.by_size.discard(_key(length, start))
        if start + length == len(self.map):
            del self.map[start:]
        else:
            self.map[start:start + length] = bytes(length)
        self.blocks -= length
        return length

    def fitting(self, blocks: int) -> Optional[int]:
        """The start of a smallest extent of at least `blocks` blocks, or None.
        Raises ValueError if the keys lie more than it sets right in passing
        (a few that do not match the map, in order: see load)."""
        if self.blocks < blocks:
            return None
        for _ in range(_LIES):
            key = self.by_size.first_from(blocks << _START_BITS)
            if key is None:
                return None
            start, length = key & _START_MASK, self.length_at(key & _START_MASK)
            if length is not None and min(length, _LONG) == key >> _START_BITS:
                return start
            self.lied = True
            if not self.by_size.discard(key):  # (out of order)
                break
        raise ValueError("the free extents' keys do not match the map")

    def take(self, start: int, blocks: int) -> None:
        """Take the first `blocks` blocks of the extent that starts at
        `start` (what is left of it stays free), in time for those blocks,
        not for the extent's."""
        length = self.length_at(start)
        if length is None or length < blocks:
            raise KeyError(start)  # no such extent: a bug
        self.by_size.discard(_key(length, start))
        self.map[start:start + blocks] = bytes(blocks)
        if length > blocks:
            self.by_size.add(_key(length - blocks, start + blocks))
        self.blocks -= blocks

    def load(self, free: bytes, keys: array[int]) -> bool:
        """Fill an empty instance from what dump() returned, or from the
        map alone (no keys: they are made from it, run by run). Returns
        False, loading nothing, if they cannot be: bytes other than 0 and 1,
        the header's block free, or not one key a run of the map. (The keys
        are not checked one by one, which would take as long as adding them:
        see fitting for what it does with one that does not match its run.)"""
        runs = free.count(b"\0\1")  # (block 0, the header's, is never free)
        if free.translate(None, b"\0\1") or free[:1] == b"\1" or len(keys) not in (0, runs):
            return False
        if runs and not keys:
            keys = self._keys_of(free)
        self.map = bytearray(free)
        self.by_size.load(keys)
        self.blocks = self.map.count(1)
        return True

    @staticmethod
    def _runs(free: bytes | bytearray) -> Iterator[tuple[int, int]]:
        """(start, end) of each run of the map, in order. O(runs)."""
        start = free.find(1)
        while start >= 0:
            end = free.find(0, start)
            end = len(free) if end < 0 else end
            yield start, end
            start = free.find(1, end)

    @classmethod
    def _keys_of(cls, free: bytes) -> array[int]:
        """The keys of the runs of the map, ascending."""
        return array("Q", sorted(_key(end - start, start)
                                 for start, end in cls._runs(free)))

    def dump(self) -> tuple[bytes, array[int]]:
        """The map, up to its last free block, and the keys (for load): made
        from the map if they are not one a run (loaded keys that lied)."""
        free = bytes(self.map).rstrip(b"\0")
        if self.lied or self.by_size.count != free.count(b"\0\1"):
            return free, self._keys_of(free)
        return free, self.by_size.dump()

    def lowest(self) -> Optional[int]:
        """The first free block, or None."""
        block = self.map.find(1)
        return None if block < 0 else block

    def extents(self) -> list[tuple[int, int]]:
        """Every extent as (start, length), by start, as the map has them.
        O(extents)."""
        return [(start, end - start) for start, end in self._runs(self.map)]


class _Expiries:
    """(expiry, place) pairs in ascending order, kept as sorted runs.

    Expiries are float bits, places a record's (see format). Each run holds
    at most 2 * _RUN pairs in two parallel arrays, so adding or removing a
    pair is a bisection over the runs' first pairs, one within the run, and
    a short memmove, however many records share one expiry; the earliest
    pairs are at the front. 16 bytes a pair.
    """

    _RUN = 512

    def __init__(self) -> None:
        self.firsts: list[tuple[int, int]] = []  # the first pair of each run
        self.exps: list[array[int]] = []    # each run's expiries, ascending
        self.keys: list[array[int]] = []    # each run's places, ascending within an expiry
        self.count = 0

    def load(self, exps: Sequence[int], keys: Sequence[int], ordered: bool = False) -> None:
        """Fill an empty instance with keys[i] expiring at exps[i]; `ordered`:
        they are in order already (as a clean close saved them; were they not,
        a pair would not be found, and the store reads .dat again: see engine)."""
        if not ordered:  # sorted as ints, exp << 48 | place as in a slot: far faster than tuples
            slots = sorted(map(or_, map(lshift, exps, repeat(_EXP_SHIFT)), keys))
            exps = list(map(rshift, slots, repeat(_EXP_SHIFT)))
            keys = list(map(and_, slots, repeat(_SLOT_MASK)))
        for at in range(0, len(exps), self._RUN):
            self.firsts.append((exps[at], keys[at]))
            self.exps.append(array("Q", exps[at:at + self._RUN]))
            self.keys.append(array("Q", keys[at:at + self._RUN]))
        self.count = len(exps)

    def dump(self) -> tuple[array[int], array[int]]:
        """All expiries and places, in order (for load)."""
        exps, keys = array("Q"), array("Q")
        for run, places in zip(self.exps, self.keys):
            exps.extend(run)
            keys.extend(places)
        return exps, keys

    def _find(self, exp: int, key: int) -> tuple[int, int]:
        """(run, position) where the pair is, or would go."""
        i = max(bisect_right(self.firsts, (exp, key)) - 1, 0)
        run = self.exps[i]
        lo = bisect_left(run, exp)
        return i, bisect_left(self.keys[i], key, lo, bisect_right(run, exp, lo))

    def add(self, exp: int, key: int) -> None:
        if not self.exps:
            self.firsts.append((exp, key))
            self.exps.append(array("Q", [exp]))
            self.keys.append(array("Q", [key]))
        else:
            i, j = self._find(exp, key)
            run, keys = self.exps[i], self.keys[i]
            run.insert(j, exp)
            keys.insert(j, key)
            if j == 0:
                self.firsts[i] = (exp, key)
            if len(run) > 2 * self._RUN:
                self.exps.insert(i + 1, run[self._RUN:])
                self.keys.insert(i + 1, keys[self._RUN:])
                self.firsts.insert(i + 1, (run[self._RUN], keys[self._RUN]))
                del run[self._RUN:], keys[self._RUN:]
        self.count += 1

    def remove(self, exp: int, key: int) -> None:
        i, j = self._find(exp, key) if self.exps else (0, 0)
        run, keys = (self.exps[i], self.keys[i]) if self.exps else (array("Q"), array("Q"))
        if j == len(keys) or keys[j] != key or run[j] != exp:
            raise KeyError(key)  # the index and the expiries disagree: a bug
        del run[j], keys[j]
        if not run:
            del self.exps[i], self.keys[i], self.firsts[i]
        elif j == 0:
            self.firsts[i] = (run[0], keys[0])
        self.count -= 1

    def due(self, now: int, limit: int) -> list[int]:
        """Up to `limit` places whose expiry is at or before `now`, earliest first."""
        due: list[int] = []
        for run, keys in zip(self.exps, self.keys):
            end = bisect_right(run, now, 0, min(len(run), limit - len(due)))
            due.extend(keys[:end])
            if end < len(run) or len(due) >= limit:
                break
        return due

    def count_due(self, now: int) -> int:
        total = 0
        for run in self.exps:
            if run[-1] > now:
                return total + bisect_right(run, now)
            total += len(run)
        return total


# --- index.py ----------------------------------------------------------------
# The index: where each key's record is, in ``path.idx``, mapped into memory.
#
# The process keeps almost nothing per key: the index lives in a file that is
# mapped into memory (its pages are the kernel's page cache, not the
# process's own memory), and a clean open reads only its header and
# directory, whatever the number of keys. It holds no keys either: each entry
# is a 32-bit hash of the key and the place of its record in ``.dat``, and the
# engine checks the key against the record it reads (see engine).
#
# It is an extendible hash table (Fagin et al., 1979). The *directory*, kept
# in memory, has ``2 ** depth`` entries; the entry for a hash is its top
# ``depth`` bits, and names the page that holds every hash that starts so.
# A page holds the hashes of one prefix of ``d <= depth`` bits (its *local
# depth*), in ascending order. A full page splits in two by the hash's next
# bit: one new page, half the entries moved, and the directory doubled if
# ``d`` was ``depth``. So an insert costs at most one page's work, never the
# whole table's, and the file grows a page at a time. When ``max_bytes`` has
# no room for that page, the entry is *spilled* instead: kept beside the
# buckets, in memory and in the snapshot a clean close writes (12 bytes,
# which the engine keeps room for), until a removal makes room in its bucket
# or the next rebuild takes it in.
#
# ``path.idx`` is a sequence of 4096-byte pages. Page 0 is the header
# (``_IDX_HEADER``, little-endian)::
#
#     magic "DSidx4\0\0"  8 bytes
#     state                1 byte: 0 closed cleanly, 1 open (or killed while open)
#     depth                1 byte: the directory's depth
#     (zero)               2 bytes
#     pages                4 bytes: pages in the file, this one included
#     keys                 8 bytes: entries in all pages
#     stamp                8 bytes: the .dat header's sequence number when a
#                          clean close wrote this (see opening)
#     tail size, CRC-32    4 + 4 bytes: of what follows the last page
#     CRC-32               4 bytes, of the fields before it
#
# Every other page is a *bucket*::
#
#     prefix               4 bytes: the top d bits its hashes share, then zeros
#     local depth d        1 byte
#     (zero)               1 byte
#     count                2 bytes: entries, at most _ENTRIES (340)
#     CRC-32               4 bytes, of the page with this field zero, written at
#                          a clean close (it is stale while the store is open)
#     (zero)               4 bytes
#     hashes               340 x 4 bytes: the entries' hashes, ascending
#     places               340 x 8 bytes: each entry's record in .dat, as
#                          format's slot without the expiry: size | block << 16
#
# After the last page, a clean close writes the *tail*: the directory
# (``2 ** depth`` page numbers of 4 bytes), then what the engine keeps besides
# (see snapshot). The file is trusted only after a clean close that
# the .dat header confirms (see opening); otherwise it is rebuilt from a scan
# of ``.dat``, which is the truth. A bucket's CRC is checked the first time it
# is used after an open.

_PAGE = 4096
_ENTRIES = 340
_IDX_HEADER = struct.Struct("<8sBB2xIQQIII")
_IDX_MAGIC = b"DSidx4\0\0"
_SPILL_ROOM = 64  # spilled entries the engine keeps room for (see engine)

_HASHES = 4      # a bucket's first hash, in 4-byte words from its start
_PLACES = 172    # its first place, in 8-byte words from its start
_CRC_WORD = 2    # its CRC, in 4-byte words
# The deepest a bucket splits: 2 ** 24 directory entries (64 MiB), which no
# store of random keys nears (a million keys need about 2 ** 13). Only keys
# chosen to share their hash's first bits could reach it: see _crowded.
_FULL_DEPTH = 24
_PLACE_MASK = (1 << 48) - 1


# The index's hash of a key: CRC-32, which spreads keys evenly and costs
# 40 ns. (Keys chosen to share one would slow their own lookups, and at
# worst be refused: see _FULL_DEPTH.)
_hash = zlib.crc32


class _Index:
    """The entries (hash, place) of path.idx. Duplicate hashes are allowed
    (keys that share one); places are unique. It knows nothing of keys or
    records: the engine checks each candidate place against .dat."""

    def __init__(self, file: int, path: str) -> None:
        self.fd, self.path = file, path
        self.pages = 0
        self.depth = 0
        self.shift = 32
        self.count = 0
        self.directory = array("I")
        self.seen = bytearray()   # 1 for buckets checked or written since open
        self.dirty = bytearray()  # 1 for buckets written since open: save() seals them
        self.damaged = False      # a bucket failed its check: rebuild from .dat
        self.spilled: dict[int, list[int]] = {}  # hash -> places no bucket took
        self.in_buckets = 0       # entries in the buckets, as loaded
        self.saved = 0            # bytes of the file as the last clean close left it
        self.map: Optional[mmap.mmap] = None
        self.u32: memoryview = memoryview(b"")
        self.u64: memoryview = memoryview(b"")

    # --- Opening and closing ---

    def load(self, stamp: int, max_bytes: int) -> Optional[bytes]:
        """Map a file that a clean close wrote with `stamp`, and return what
        its tail holds after the directory; None (nothing kept) if it is
        missing, another close's, larger than `max_bytes`, or damaged.
        Reads the header and the tail, and a word of each bucket."""
        size = os.fstat(self.fd).st_size
        if size > max_bytes:  # (a sparse file claiming more: not read)
            return None
        fields = _saved_header(self.fd, stamp)
        if fields is None or fields[0] != _IDX_MAGIC or not _LITTLE:  # (pages: machine order)
            return None
        _, _, depth, pages, count, _, tail, tail_crc, _ = fields
        if (depth > _FULL_DEPTH or pages < 2 or size != pages * _PAGE + tail
                or tail < 4 << depth):
            return None
        data = _read_at(self.fd, tail, pages * _PAGE)
        if zlib.crc32(data) != tail_crc:
            return None
        directory = array("I", data[:4 << depth])
        if min(directory) < 1 or max(directory) >= pages:
            return None
        self.depth, self.shift, self.pages, self.count = depth, 32 - depth, pages, count
        self.directory = directory
        self.seen, self.dirty = bytearray(pages), bytearray(pages)
        self.seen[0] = 1
        self.saved = size
        self._map()
        assert self.map is not None
        counts = memoryview(self.map).cast("H")[(_PAGE + 6) // 2::_PAGE // 2]  # each bucket's
        self.in_buckets = sum(counts)  # (the rest were spilled: see snapshot)
        whole = self.in_buckets <= count and max(counts, default=0) <= _ENTRIES
        counts.release()
        if not whole:  # its buckets do not hold what its header says
            self.forget()
            return None
        return data[4 << depth:]

    def forget(self) -> None:
        """Unmap a file load() mapped, and hold nothing (before a scan)."""
        self._unmap()
        self.pages = self.depth = self.count = self.saved = 0
        self.shift = 32
        self.directory = array("I")

    def build(self, hashes: Iterable[int], places: Iterable[int],
              room: Optional[int] = None) -> None:
        """Make the index hold exactly the entries (hashes[i], places[i]), in a
        file written anew. O(entries), for an open that scanned .dat. A
        bucket splits only if it must, so the file takes no more pages than
        adding the same entries one by one would; and only while the file,
        and 12 bytes a spilled entry, stay within `room` bytes: past that,
        entries are spilled, as adding them one by one at the cap would. If
        it fails, the index is `damaged`: the store reads .dat again before
        its next call."""
        packed = sorted(map(or_, map(lshift, hashes, repeat(48)), places))
        buckets, spill = self._layout(packed, room)  # (it raises before any change)
        try:
            self._build(packed, buckets, spill)
        except BaseException:
            self.damaged = True
            raise

    def _layout(self, packed: list[int], room: Optional[int]
                ) -> tuple[list[tuple[int, int, int, int]], list[int]]:
        """The buckets, (prefix, depth, lo, hi) of packed, and the entries
        spilled, of a build (packed: each entry as hash << 48 | place, in
        order). Raises _StoreFull if they cannot fit in `room`. Buckets split
        breadth first, so that where `room` runs out, the spilled entries
        are those of the deepest buckets, the fewest, as one by one."""
        buckets: list[tuple[int, int, int, int]] = []
        spill: list[int] = []
        queue, deepest = deque([(0, 0, 0, len(packed))]), 0
        while queue:
            prefix, depth, lo, hi = queue.popleft()
            if hi - lo > _ENTRIES and depth < _FULL_DEPTH and (room is None or (
                    len(buckets) + len(queue) + 3) * _PAGE + (4 << max(deepest, depth + 1))
                    + 12 * len(spill) <= room):  # (header, buckets, the new one)
                upper = prefix | 1 << (31 - depth)
                mid = bisect_left(packed, upper << 48, lo, hi)
                queue.append((upper, depth + 1, mid, hi))
                queue.append((prefix, depth + 1, lo, mid))
                deepest = max(deepest, depth + 1)
                continue
            if hi - lo > _ENTRIES:  # no room to split it, or it cannot split
                if room is None:
                    raise _damaged(self.path, _crowded())
                spill.extend(packed[lo + _ENTRIES:hi])
                hi = lo + _ENTRIES
            buckets.append((prefix, depth, lo, hi))
        needed = (len(buckets) + 1) * _PAGE + (4 << deepest) + 12 * len(spill)
        if room is not None and needed > room:
            raise _StoreFull(0, needed)
        return buckets, spill

    def _build(self, packed: list[int], buckets: list[tuple[int, int, int, int]],
               spill: list[int]) -> None:
        self._unmap()
        self.spilled = {}
        self.saved = os.fstat(self.fd).st_size  # until it is cut to the new pages
        buckets.sort()
        self.depth = max(depth for _, depth, _, _ in buckets)
        self.shift = 32 - self.depth
        self.pages, self.count = len(buckets) + 1, len(packed)
        self.directory = array("I", bytes(4 << self.depth))
        os.ftruncate(self.fd, 0)
        for page in range(0, self.pages, 256):  # blocks for the map's writes
            _write_at(self.fd, bytes(_PAGE * min(256, self.pages - page)), page * _PAGE)
        self._map()
        for page, (prefix, depth, lo, hi) in enumerate(buckets, 1):
            base = page << 10
            self.u32[base] = prefix
            self.u32[base + 1] = depth | (hi - lo) << 16
            chunk = packed[lo:hi]
            self.u32[base + _HASHES:base + _HASHES + hi - lo] = array(
                "I", map(rshift, chunk, repeat(48)))
            places = (page << 9) + _PLACES
            self.u64[places:places + hi - lo] = array("Q", map(and_, chunk, repeat(_PLACE_MASK)))
            first = prefix >> self.shift
            self.directory[first:first + (1 << (self.depth - depth))] = array(
                "I", [page]) * (1 << (self.depth - depth))
        for entry in spill:
            self.spilled.setdefault(entry >> 48, []).append(entry & _PLACE_MASK)
        self.seen = bytearray(b"\1") * self.pages
        self.dirty = bytearray(b"\0") + bytearray(b"\1") * (self.pages - 1)
        self.saved = 0
        self.write_header(_OPEN)

    def write_header(self, state: int, stamp: int = 0, tail: bytes = b"") -> None:
        fields = _IDX_HEADER.pack(_IDX_MAGIC, state, self.depth, self.pages, self.count,
                                  stamp, len(tail), zlib.crc32(tail), 0)[:-4]
        _write_at(self.fd, fields + zlib.crc32(fields).to_bytes(4, "little"), 0)

    def save(self, stamp: int, extra: bytes) -> None:
        """For a clean close: the CRCs of the buckets used since open, the
        tail (the directory, then `extra`), everything fsynced, then the
        header marked closed with `stamp`, fsynced (then the caller marks
        .dat closed)."""
        assert self.map is not None
        for page in _ones(self.dirty):
            self.u32[(page << 10) + _CRC_WORD] = self._crc(page)
            self.dirty[page] = 0
        tail = self.directory.tobytes() + extra
        _write_at(self.fd, tail, self.pages * _PAGE)
        os.ftruncate(self.fd, self.pages * _PAGE + len(tail))
        self.saved = self.pages * _PAGE + len(tail)
        self.map.flush()
        _fsync(self.fd)
        self.write_header(_CLOSED, stamp, tail)
        _fsync(self.fd)

    def drop_tail(self) -> None:
        """Cut what a clean close appended after the pages."""
        if self.saved > self.pages * _PAGE:
            os.ftruncate(self.fd, self.pages * _PAGE)
        self.saved = 0

    def rebuild(self, room: Optional[int] = None) -> None:
        """Build the file anew from its own entries, in as few pages as
        they need (the file never shrinks otherwise), within `room` (see
        build). O(entries)."""
        hashes, places = array("I"), array("Q")
        for page in range(1, self.pages):
            if not self.seen[page]:
                self._check(page)
            base, first = page << 10, (page << 9) + _PLACES
            count = self.u32[base + 1] >> 16
            hashes.extend(self.u32[base + _HASHES:base + _HASHES + count])
            places.extend(self.u64[first:first + count])
        for h, spilled in self.spilled.items():
            hashes.extend([h] * len(spilled))
            places.extend(spilled)
        self.build(hashes, places, room)

    def room(self) -> int:
        """Bytes of the pages, with the directory a close writes."""
        return self.pages * _PAGE + 4 * len(self.directory)

    def size(self) -> int:
        """Bytes of the file now (a clean close's tail may still be there)."""
        return max(self.pages * _PAGE, self.saved)

    def close(self) -> None:
        self._unmap()

    def _map(self) -> None:
        self.map = mmap.mmap(self.fd, self.pages * _PAGE)
        view = memoryview(self.map)
        self.u32, self.u64 = view.cast("I"), view.cast("Q")
        view.release()

    def _unmap(self) -> None:
        self.u32.release()
        self.u64.release()
        mapped, self.map = self.map, None
        if mapped is not None:
            try:
                mapped.close()
            except BufferError:  # a view of it lives on (a fork cut a call short):
                pass             # it is unmapped when that view goes

    # --- Lookups ---

    def find(self, h: int) -> list[int]:
        """The places of the entries with hash h (usually none or one)."""
        page = self.directory[h >> self.shift]
        if not self.seen[page]:
            self._check(page)
        base = page << 10
        lo = base + _HASHES
        hi = lo + (self.u32[base + 1] >> 16)
        i = bisect_left(self.u32, h, lo, hi)
        places, u32 = [], self.u32
        while i < hi and u32[i] == h:
            places.append(self.u64[(page << 9) + _PLACES + i - lo])
            i += 1
        if self.spilled:
            places.extend(self.spilled.get(h, ()))
        return places

    def places(self) -> list[int]:
        """Every entry's place. O(entries)."""
        found: list[int] = []
        for page in range(1, self.pages):
            if not self.seen[page]:
                self._check(page)
            first = (page << 9) + _PLACES
            found.extend(self.u64[first:first + (self.u32[(page << 10) + 1] >> 16)])
        for spilled in self.spilled.values():
            found.extend(spilled)
        return found

    def _crc(self, page: int) -> int:
        """A bucket's CRC-32, its own field taken as zero. (Read as a copy:
        a view of the map would pin it, should a fork come meanwhile.)"""
        assert self.map is not None
        data = self.map[page * _PAGE:(page + 1) * _PAGE]
        return zlib.crc32(data[4 * _CRC_WORD + 4:], zlib.crc32(
            bytes(4), zlib.crc32(data[:4 * _CRC_WORD])))

    def _check(self, page: int) -> None:
        base = page << 10
        word = self.u32[base + 1]
        if (self._crc(page) != self.u32[base + _CRC_WORD] or word >> 16 > _ENTRIES
                or word & 0xFF > self.depth):
            self.damaged = True
            raise _damaged(self.path, f"page {page} is damaged; the next call rebuilds "
                           "it from the data file")
        self.seen[page] = 1

    # --- Changes ---

    def split_cost(self, h: int) -> int:
        """Bytes the file (and its directory) would grow by to add h."""
        page = self.directory[h >> self.shift]
        if not self.seen[page]:
            self._check(page)
        base = page << 10
        word = self.u32[base + 1]
        if word >> 16 < _ENTRIES:
            return 0
        count, local, prefix, depth = word >> 16, word & 0xFF, self.u32[base], self.depth
        lo, hi, cost = base + _HASHES, base + _HASHES + (word >> 16), 0
        while count >= _ENTRIES:  # as the splits would go, on h's side
            if local == _FULL_DEPTH:
                raise _StoreFull(_PAGE, 0, _crowded())
            upper = prefix | 1 << (31 - local)
            mid = bisect_left(self.u32, upper, lo, hi)
            if local == depth:
                cost += 4 << depth
                depth += 1
            cost += _PAGE
            local += 1
            if h >= upper:
                prefix, lo = upper, mid
            else:
                hi = mid
            count = hi - lo
        return cost

    def make_room(self, h: int) -> None:
        """Split h's bucket until it has room for one more entry (the caller
        has checked split_cost's room): the one step of adding an entry
        that writes to the file, so that the caller can take it before it
        commits to anything. Splits nothing in vain: see split_cost."""
        page = self.directory[h >> self.shift]
        if self.seen[page] and self.u32[(page << 10) + 1] >> 16 < _ENTRIES:
            return  # (most of the time)
        self.split_cost(h)
        while True:
            page = self.directory[h >> self.shift]
            if not self.seen[page]:
                self._check(page)
            if self.u32[(page << 10) + 1] >> 16 < _ENTRIES:
                return
            self._split(page)

    def add(self, h: int, place: int) -> None:
        """Add an entry, once make_room(h) has made room. No I/O."""
        page = self.directory[h >> self.shift]
        base = page << 10
        word = self.u32[base + 1]
        assert word >> 16 < _ENTRIES and self.seen[page]
        self.dirty[page] = 1
        u32, u64 = self.u32, self.u64
        lo = base + _HASHES
        hi = lo + (word >> 16)
        i = bisect_right(u32, h, lo, hi)
        u32[i + 1:hi + 1] = u32[i:hi]
        u32[i] = h
        first = (page << 9) + _PLACES
        j, end = first + i - lo, first + hi - lo
        u64[j + 1:end + 1] = u64[j:end]
        u64[j] = place
        u32[base + 1] = word + (1 << 16)
        self.count += 1

    def spill(self, h: int, place: int) -> None:
        """Add an entry beside the buckets (see the module docstring). No I/O."""
        self.spilled.setdefault(h, []).append(place)
        self.count += 1

    def _unspill(self, h: int, place: int, new: Optional[int] = None) -> bool:
        """Take a spilled entry out (or give it place `new`); False if none."""
        spilled = self.spilled.get(h)
        if not spilled or place not in spilled:
            return False
        if new is None:
            spilled.remove(place)
            self.count -= 1
            if not spilled:
                del self.spilled[h]
        else:
            spilled[spilled.index(place)] = new
        return True

    def remove(self, h: int, place: int) -> None:
        if self.spilled and self._unspill(h, place):
            return
        page, i, lo, hi = self._entry(h, place)
        base, u32, u64 = page << 10, self.u32, self.u64
        u32[i:hi - 1] = u32[i + 1:hi]
        u32[hi - 1] = 0
        first = (page << 9) + _PLACES
        j, end = first + i - lo, first + hi - lo
        u64[j:end - 1] = u64[j + 1:end]
        u64[end - 1] = 0
        u32[base + 1] -= 1 << 16
        self.count -= 1
        if self.spilled:
            self._take_back(page)

    def _take_back(self, page: int) -> None:
        """Move an entry spilled beside `page`, if any, into the room a
        removal just made in it: so entries spilled at the cap go back into
        the buckets as deletes make room, and stay few."""
        for h, places in self.spilled.items():
            if self.directory[h >> self.shift] == page:
                place = places[-1]
                self._unspill(h, place)
                self.add(h, place)
                return

    def replace(self, h: int, place: int, new: int) -> None:
        if self.spilled and self._unspill(h, place, new):
            return
        page, i, lo, _ = self._entry(h, place)
        self.u64[(page << 9) + _PLACES + i - lo] = new

    def _entry(self, h: int, place: int) -> tuple[int, int, int, int]:
        """(page, hash word, first and end hash words of its page) of an entry."""
        page = self.directory[h >> self.shift]
        if not self.seen[page]:
            self._check(page)
        self.dirty[page] = 1  # (the caller changes it)
        base = page << 10
        lo = base + _HASHES
        hi = lo + (self.u32[base + 1] >> 16)
        first = (page << 9) + _PLACES - lo
        i = bisect_left(self.u32, h, lo, hi)
        while i < hi and self.u32[i] == h:
            if self.u64[first + i] == place:
                return page, i, lo, hi
            i += 1
        self.damaged = True  # the index does not hold what .dat says it must
        raise _damaged(self.path, f"it has no entry for the record at block {place >> 16}")

    def _split(self, page: int) -> None:
        """Split a full bucket by the next bit of its hashes: a new page
        takes those with the bit set. Doubles the directory if need be."""
        base = page << 10
        word = self.u32[base + 1]
        local, count = word & 0xFF, word >> 16
        if local == _FULL_DEPTH:
            raise _StoreFull(_PAGE, 0, _crowded())
        new = self.pages
        try:
            _write_at(self.fd, bytes(_PAGE), new * _PAGE)  # blocks, before the map uses them
        except OSError:  # (a disk filling part-way): what nothing counts goes
            with suppress(OSError):
                os.ftruncate(self.fd, new * _PAGE)
            raise
        try:
            self._unmap()
            self.pages += 1
            self.seen.append(1)
            self.dirty.append(1)
            self.dirty[page] = 1
            self._map()
        except BaseException:  # (mmap failing: no memory for its tables, say)
            self.damaged = True
            raise
        u32, u64 = self.u32, self.u64
        upper = u32[base] | 1 << (31 - local)
        lo = base + _HASHES
        mid = bisect_left(u32, upper, lo, lo + count) - lo
        moved, nb = count - mid, new << 10
        u32[nb + _HASHES:nb + _HASHES + moved] = u32[lo + mid:lo + count]
        u32[lo + mid:lo + count] = array("I", bytes(4 * moved))
        first, new_first = (page << 9) + _PLACES, (new << 9) + _PLACES
        u64[new_first:new_first + moved] = u64[first + mid:first + count]
        u64[first + mid:first + count] = array("Q", bytes(8 * moved))
        u32[nb] = upper
        u32[nb + 1] = local + 1 | moved << 16
        u32[base + 1] = local + 1 | mid << 16
        if local == self.depth:
            doubled = array("I", bytes(8 << self.depth))
            doubled[0::2] = self.directory
            doubled[1::2] = self.directory
            self.directory, self.depth, self.shift = doubled, self.depth + 1, self.shift - 1
        span = 1 << (self.depth - local - 1)
        start = upper >> self.shift
        self.directory[start:start + span] = array("I", [new]) * span


_LITTLE = struct.pack("=I", 1) == struct.pack("<I", 1)


def _crowded() -> str:
    return (f"more than {_ENTRIES} of its keys share the first {_FULL_DEPTH} bits of "
            "their index hash (CRC-32), which keys chosen at random never do")


def _saved_header(fd: int, stamp: Optional[int] = None) -> Optional[tuple[Any, ...]]:
    """The fields of the index file's header, if it is valid (and, when
    `stamp` is given, says a clean close saved it with that stamp)."""
    header = _read_at(fd, _IDX_HEADER.size, 0)
    if len(header) < _IDX_HEADER.size:
        return None
    fields = _IDX_HEADER.unpack(header)
    magic, state, _, _, _, file_stamp, _, _, crc = fields
    if magic != _IDX_MAGIC or zlib.crc32(header[:-4]) != crc or (
            stamp is not None and (state != _CLOSED or file_stamp != stamp)):
        return None
    return fields


def _keys_saved(fd: int, stamp: Optional[int] = None) -> Optional[int]:
    """The number of keys the index file `fd` says it holds (if saved with
    `stamp`, when given), or None if it has no valid header."""
    fields = _saved_header(fd, stamp)
    return None if fields is None else int(fields[4])


def _ones(flags: bytearray) -> Iterable[int]:
    """The positions of the nonzero bytes of `flags`."""
    at = flags.find(1)
    while at >= 0:
        yield at
        at = flags.find(1, at + 1)


# --- locks.py ----------------------------------------------------------------
# Keeping a store to one process: two locks, a registry, fork and exit.
#
# A store holds two locks from open to close, and the operating system drops
# both when the process dies, even by ``kill -9``:
#
# * ``fasteners``' ``InterProcessLock`` on ``path.lock``: a POSIX record lock
#   (``msvcrt.locking`` on Windows). It belongs to the process, so the process
#   could take it twice, and closing *any* descriptor of the file drops it;
#   deleting the file lets a second process in. ``timeout`` waits on it.
# * An ``flock`` on ``path.dat``, through the descriptor the engine holds for
#   the store's life (``_lock_data_file``). It belongs to that open file, so
#   deleting ``path.lock`` does not defeat it; a child made by ``fork()``
#   shares it with the parent.
#
# Against the traps of each: a registry of the stores open in this process,
# keyed by the identity (device, inode) of their lock file and data file,
# refuses a second open under any spelling of the path, so no second
# descriptor of the lock file is ever opened; identities are read with
# ``stat``, never by opening a file. A forked child closes its copies of every
# store's descriptors at once, without unlocking. A store that is garbage
# collected, or still open at exit, is closed by ``_finalize``.

if sys.platform != "win32":
    import fcntl  # flock; on Windows only fasteners' lock on path.lock applies



def _lock_data_file(fd: int, path: str, deadline: Optional[float]) -> None:
    """flock .dat's descriptor `fd`, waiting until `deadline` at most, then
    check that the file at `path` is the one locked (it may have been
    replaced while we waited). Raises _Locked if either fails."""
    if sys.platform == "win32":
        return  # fasteners' lock on path.lock is the only one there
    delay = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise _Locked() from None
            time.sleep(delay)
            delay = min(2 * delay, 0.1)
    held, there = os.fstat(fd), os.stat(path)
    if (held.st_dev, held.st_ino) != (there.st_dev, there.st_ino):
        raise _Locked()  # replaced while we waited: another opener's now


# What we rely on in fasteners (0.18 to 0.20), in one place. InterProcessLock
# opens path.lock when acquiring and keeps it open; acquire(blocking,
# timeout=) returns False when it gives up; release() unlocks, sets
# `acquired` False, then closes the file (its `lockfile` attribute, None once
# closed). After a failed acquire the file stays open; we close it ourselves
# rather than leave it to the garbage collector. Closing it drops no lock of
# ours: this process holds none on that file (the registry below makes sure
# of it).

def _close_unlocked(lock: Any) -> None:
    if lock.lockfile is not None:
        lock.lockfile.close()
        lock.lockfile = None


def _release(lock: Any) -> None:
    """Release fasteners' lock; if a release was cut short part-way, finish it."""
    if lock.acquired:
        lock.release()
    else:
        _close_unlocked(lock)


def _file_identity(path: str) -> list[tuple[int, int]]:
    """[(st_dev, st_ino)] of a file, by os.stat, or [] if there is none."""
    try:
        info = os.stat(path)
    except OSError:  # missing, or unreadable: opening it will say which
        return []
    return [(info.st_dev, info.st_ino)]


def _lock_file_identity(lock_path: str) -> tuple[int, int]:
    """(st_dev, st_ino) of a store's lock file, created if missing.

    Taken with os.stat, never by opening the file: closing a descriptor of it
    would drop a lock this process holds on it through another DataStore.
    """
    try:
        info = os.stat(lock_path)
    except FileNotFoundError:  # nobody in this process can hold a lock on it
        os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600))
        info = os.stat(lock_path)
    if not stat.S_ISREG(info.st_mode):
        raise CorruptStoreError(f"{lock_path} is not a regular file; move it away",
                                path=lock_path)
    return info.st_dev, info.st_ino


# Stores open in this process, by the identity of their lock file and data
# file: a second spelling of the same files (a symbolic link, a bind mount,
# another letter case on macOS) is refused. Held weakly: a store that is
# garbage collected leaves, after its finalizer closed it.
_open_stores: weakref.WeakValueDictionary[tuple[int, int], DataStore] = (
    weakref.WeakValueDictionary())
_open_stores_lock = threading.Lock()
# Every engine with files open (or opening) in this process, for the fork hook.
_engines: weakref.WeakSet[_Engine] = weakref.WeakSet()


def _reserve(store: DataStore, lock_path: str, dat_path: str
             ) -> tuple[list[tuple[int, int]], Optional[DataStore]]:
    """Register `store` under the identities of its lock file and data file,
    while it waits for their locks, unless another store has either here:
    then that one is returned too, and nothing registered. (If the lock file
    was deleted and made anew, the data file still says the store is open.)"""
    with _open_stores_lock:
        identities = [_lock_file_identity(lock_path)] + _file_identity(dat_path)
        for identity in identities:
            holder = _open_stores.get(identity)
            if holder is not None:
                return identities, holder
        for identity in identities:
            _open_stores[identity] = store
        return identities, None


def _hold_data_file(store: DataStore, identities: list[tuple[int, int]], dat_fd: int) -> None:
    """Once locked, key `store` by the data file it locked (new, or replaced
    while it waited), not the one stat saw before."""
    info = os.fstat(dat_fd)
    with _open_stores_lock:
        for identity in identities[1:]:
            _open_stores.pop(identity, None)
        identities[1:] = [(info.st_dev, info.st_ino)]
        _open_stores[info.st_dev, info.st_ino] = store


def _unreserve(store: DataStore, identities: list[tuple[int, int]]) -> None:
    with _open_stores_lock:
        for identity in identities:
            if _open_stores.get(identity) is store:
                del _open_stores[identity]


def _after_fork_in_child() -> None:
    """In a child made by fork(): let go of the parent's stores and start the
    registry's lock afresh (another thread may have held it at the fork).

    The child closes its copies of each store's descriptors and never
    unlocks: an flock is shared with the parent, which still holds it.
    """
    global _open_stores_lock
    _open_stores_lock = threading.Lock()
    engines = list(_engines)  # stores being opened too
    for engine in engines:  # all of them first: closing one might fail
        engine.forked = True
    for engine in engines:
        try:
            engine.close_files()
        except Exception:  # (the child has no use for the parent's files anyway)
            pass
    _open_stores.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _finalize(mutex: threading.Lock, engine: _Engine, lock: Any, pid: int) -> None:
    """Close a store that was garbage collected, or still open at exit.

    It runs in whatever thread triggers the collection, so it takes no lock
    that thread could hold: the registry drops the store by itself, and the
    store's own mutex is free (any thread inside a call would hold a
    reference). At exit, a daemon thread may still be inside a call: then it
    leaves the files to the next open's recovery rather than wait.
    """
    if os.getpid() != pid:
        engine.close_files()  # a forked child: the files and locks are the parent's
        return
    if not mutex.acquire(timeout=1.0):
        return
    try:
        engine.close(time.time())
    except OSError:
        pass  # not closed cleanly: the next open scans the data file
    finally:
        mutex.release()
        _release(lock)


# --- snapshot.py -------------------------------------------------------------
# The snapshot: what a clean close leaves in ``.idx`` for a fast next open.
#
# A clean ``close()`` fsyncs ``.dat``, then saves the index (see index) with,
# in its tail after the directory, what the engine keeps in memory besides
# (``_SNAPSHOT``, little-endian)::
#
#     .dat size          8 bytes: where .dat ended at the close
#     free extents       4 bytes: how many, n
#     expiring records   4 bytes: how many, m
#     spilled entries    4 bytes: how many, s (index entries no bucket took)
#     free map           4 bytes: its length, b (at most .dat's blocks)
#     records by blocks  (_MAX_BLOCKS + 1) x 4 bytes: indexed records taking
#                        0, 1, 2, ... blocks
#     free map           b bytes: 1 for each free block of .dat, else 0
#     free extents       n x 8 bytes: each one's length (up to _MAX_BLOCKS,
#                        or _LONG for longer) << 32 | its start block,
#                        ascending (see space); or none (n = 0) if they do
#                        not fit in max_bytes: the open then finds them in
#                        the map
#     expiries           m x 8 bytes: expires_at bits, ascending, then
#                        m x 8 bytes: each one's place (see format)
#     spilled entries    s x 4 bytes: hashes, then s x 8 bytes: places
#
# and only then marks the header of ``.dat`` *closed*. The next open trusts
# ``.idx`` only if the header says closed and ``.idx`` says it was saved at
# that very close (see index), and ``.dat`` is the size it was: then it reads
# the header and the tail, and nothing per key but the expiries; the free
# space is loaded whole, however many extents (see space). Otherwise
# it scans ``.dat`` (see recovery). What matches but makes no sense is
# damage, and is refused.

_SNAPSHOT = struct.Struct(f"<QIIII{_MAX_BLOCKS + 1}I")
_PER_EXPIRY = 16  # bytes of the snapshot an expiring record takes


def _snapshot_room(extents: int, expiring: int, spilled: int = 0, blocks: int = 0) -> int:
    """Bytes of the snapshot with so many free extents, expiring records and
    spilled index entries, for a .dat of so many blocks."""
    return _SNAPSHOT.size + blocks + 8 * extents + _PER_EXPIRY * expiring + 12 * spilled


def _write_snapshot(engine: _Engine) -> None:
    """Fsync .dat, save .idx with the snapshot, then mark the header closed,
    both with a new random stamp: a snapshot is trusted with the very .dat
    it was saved with, never with an older or newer copy, or another
    store's."""
    engine._sync()  # the records .idx points at, before .idx is trusted
    engine.stamp = int.from_bytes(os.urandom(8), "little") or 1
    free, extents = engine.free.dump()
    exps, places = engine.expiries.dump()
    spilled = [(h, place) for h, held in engine.index.spilled.items() for place in held]
    if engine.used() + 8 * len(extents) > engine.max_bytes:
        extents = array("Q")  # (no room is kept for them: see engine._snapshot_room)
    data = b"".join((
        _SNAPSHOT.pack(engine.dat_size, len(extents), len(exps), len(spilled), len(free),
                       *engine.by_blocks),
        free, extents.tobytes(), exps.tobytes(), places.tobytes(),
        array("I", [h for h, _ in spilled]).tobytes(),
        array("Q", [place for _, place in spilled]).tobytes()))
    engine.index.save(engine.stamp, data)
    engine._write_header(_CLOSED)


def _load_snapshot(engine: _Engine, header: _Header) -> bool:
    """Load .idx and the snapshot a clean close wrote. Returns False if they
    do not match the header or .dat (then scan .dat). What matches but does
    not make sense raises CorruptStoreError."""
    engine.dat_size = os.fstat(engine.dat).st_size
    if header.version != 4 or header.state != _CLOSED or not header.stamp:
        return False
    data = engine.index.load(header.stamp, engine.max_bytes)
    if data is None:
        return False
    if len(data) < _SNAPSHOT.size:
        raise _damaged(engine.idx_path, "its snapshot is cut short")
    dat_size, extents, expiring, spills, blocks, *by_blocks = _SNAPSHOT.unpack_from(data)
    if dat_size != engine.dat_size:
        engine.index.forget()
        return False
    at = _SNAPSHOT.size
    index = engine.index
    if (len(data) != _snapshot_room(extents, expiring, spills, blocks)
            or sum(by_blocks) != index.count or expiring > index.count
            or index.in_buckets + spills != index.count):
        raise _damaged(engine.idx_path, "its snapshot does not match its index")
    if blocks > _blocks(dat_size) or not engine.free.load(
            data[at:at + blocks], array("Q", data[at + blocks:at + blocks + 8 * extents])):
        raise _damaged(engine.idx_path, "its free space makes no sense")
    at += blocks + 8 * extents
    exps = array("Q", data[at:at + 8 * expiring])
    places = array("Q", data[at + 8 * expiring:at + 16 * expiring])
    at += 16 * expiring
    for h, place in zip(array("I", data[at:at + 4 * spills]),
                        array("Q", data[at + 4 * spills:])):
        index.spilled.setdefault(h, []).append(place)
    if exps and max(exps) > _LATEST_EXPIRY_BITS:
        raise _damaged(engine.idx_path, "its snapshot is out of bounds")
    engine.by_blocks = list(by_blocks)
    engine.largest = max((n for n in range(_MAX_BLOCKS + 1) if by_blocks[n]), default=0)
    engine.expiries.load(exps, places, ordered=True)
    engine.seq, engine.stamp = header.seq, header.stamp
    engine.changed = False  # (unless the trim at open writes: see opening)
    if engine.used() > engine.max_bytes:  # filled under a larger max_bytes
        raise _StoreFull(0, engine.used())
    return True


# --- recovery.py -------------------------------------------------------------
# Recovery: rebuilding the index by scanning .dat, after a crash.
#
# ``.dat`` is the truth; ``.idx`` is trusted only after a clean close (see
# ``snapshot``), and is rebuilt from the scan otherwise. Opening a store marks its header
# *open* (fsynced) before anything else is written, so a store that was not
# closed cleanly is always scanned:
#
# * A record counts only if its CRC-32 matches, so a torn write is never taken
#   for data. Free markers are recognised too, so the scan
#   can tell free space from damage; damage beyond the one record a crash can
#   tear is logged on the ``datastore`` logger.
# * Each key has at most one valid record at rest. While a record is being
#   moved or replaced there are two, and the higher sequence number wins; the
#   scan then invalidates the other before the store is used. Sequence
#   numbers never go back: the header holds a bound that every number issued
#   while open stays below, and the scan starts above both that bound and
#   every record it saw.
# * A record that an earlier ``sync()`` (or open) made durable is never
#   invalidated or truncated away before its copy is fsynced, so a power cut
#   cannot lose both. A failed fsync refuses further writes until reopened,
#   because the kernel may have dropped the pages it could not write.
#
# The scan reads ``.dat`` in chunks and checks the value records of a chunk
# in bulk (``_values``), several times faster than one by one; free markers,
# which are fewer, go through ``_parse_item``.

_SCAN_CHUNK = 1 << 22  # bytes of .dat read at a time by a scan


def _derive_free(engine: _Engine, held: Iterable[int], marked: Optional[dict[int, int]]) -> None:
    """Make every block no record holds (`held`: their slots) a free
    extent. With `marked` (the free markers a scan found: block -> length),
    also write a marker at the start of each extent that has no exact one
    yet. (In bulk: per record, map() and friends run in C, and only the
    gaps in Python.)"""
    slots = sorted(map(and_, held, repeat(_SLOT_MASK)))  # by block
    starts = list(map(rshift, slots, repeat(_BLOCK_SHIFT)))
    lengths = list(map(rshift, map(add, map(and_, slots, repeat(_SIZE_MASK)),
                                   repeat(_BLOCK - 1)), repeat(_BLOCK_BITS)))
    ends = [1] + list(map(add, starts, lengths))  # block 0 is the header
    starts.append(max(_blocks(engine.dat_size), ends[-1]))
    if any(map(lt, starts, ends)):
        block = next(compress(starts, map(lt, starts, ends)))
        raise _damaged(engine.dat_path, f"records overlap at block {block}")
    for end, start in compress(zip(ends, starts), map(lt, ends, starts)):
        _new_free(engine, end, start - end, marked)
    for blocks, count in Counter(lengths).items():
        engine.by_blocks[blocks] += count
    engine.largest = max((n for n in range(_MAX_BLOCKS + 1) if engine.by_blocks[n]), default=0)


def _new_free(engine: _Engine, start: int, length: int, marked: Optional[dict[int, int]]) -> None:
    if marked is not None and marked.get(start) != length:
        engine._write_marker(start, length)
    engine.free.add(start, length)


def _holds_records(engine: _Engine, magic: bytes = _MAGIC, step: int = _BLOCK) -> bool:
    """Whether .dat holds any valid record or marker under `magic` at a
    multiple of `step` bytes (for a file whose header is not valid:
    damaged, or not a store's)."""
    return any(True for _ in _items_at(engine, magic, step))


def _items_at(engine: _Engine, magic: bytes, step: int) -> Iterator[tuple[int, _Item]]:
    """(where it starts in .dat, _parse_item's fields) of each valid record
    or marker under `magic` at a multiple of `step` bytes, one by one."""
    size = os.fstat(engine.dat).st_size
    for first, buf, starts in _chunks(engine.dat, size, _HEAD.size, step):
        for off in starts:
            item = _parse_item(buf, off, magic) if buf.startswith(magic, off) else None
            if item is not None:
                yield first * _BLOCK + off, item


def _recover(engine: _Engine, header: Optional[_Header], listed: Optional[int] = None,
             converted: Optional[int] = None) -> None:
    """Rebuild the index by scanning .dat. If the header says the store was
    closed cleanly, its snapshot did not match .dat: that is damage, not a
    crash, and `listed` is the number of keys the snapshot held, if known
    (see _report_damage). The free space of a store `converted` from
    version 2 or 3 (see legacy) has no marker of this version to explain
    it: only keys its index listed and the scan did not find are damage."""
    engine.dat_size = os.fstat(engine.dat).st_size
    found: dict[bytes, int] = {}
    losers, marked, newest = _scan(engine, found)
    engine.seq = max(header.seq if header else 1, newest + 1)
    _index_found(engine, found, losers, marked, bool(converted))
    closed = header is not None and header.state == _CLOSED
    if converted:
        engine.lost = max(0, (listed or 0) - engine.index.count) if closed else 0
        _log.log(logging.WARNING if engine.lost else logging.INFO,
                 "datastore %s: converted from version %d (%d keys)%s", engine.dat_path[:-4],
                 converted, engine.index.count, f"; lost {engine.lost} key(s) its index "
                 "listed: its files were damaged since it was closed" if engine.lost else "")
        return
    if closed and engine.dat_size <= _BLOCK and not listed:
        return  # a new store, which has no .idx yet
    _report_damage(engine, _unexplained(engine, {**marked, **dict(losers)}), closed, listed)


def _index_found(engine: _Engine, found: dict[bytes, int], losers: list[tuple[int, int]],
                 marked: dict[int, int], converted: bool = False) -> None:
    """From a scan's newest copy of each key (`found`, key -> slot): refuse a
    store too large for max_bytes (see _check_room), invalidate the older
    copies (`losers`), derive the free space, list the expiries and build
    .idx."""
    slots = list(found.values())
    last = max(map(and_, slots, repeat(_SLOT_MASK)), default=0)
    end = _slot_block(last) * _BLOCK + _slot_size(last)
    exps = list(map(rshift, slots, repeat(_EXP_SHIFT)))
    _check_room(engine, end, converted, sum(map(bool, exps)))
    if losers:  # older copies of keys: never again valid, once the newer are durable
        _fsync(engine.dat)
    for block, length in losers:
        engine._write_marker(block, length)
    _derive_free(engine, slots, marked)
    expiring = sorted(compress(slots, exps))  # by expiry, then place (see format)
    engine.expiries.load(list(map(rshift, expiring, repeat(_EXP_SHIFT))),
                         list(map(and_, expiring, repeat(_SLOT_MASK))), ordered=True)
    def build(room: int) -> None:  # spilling what no page has room for (see index)
        engine.index.build(map(_hash, found), map(and_, slots, repeat(_SLOT_MASK)), room)

    room = engine.index_room(end)
    try:
        try:
            build(room)
        except _StoreFull:  # then past what is kept in reserve (see _check_room)
            room = engine.max_bytes - max(_blocks(end), 1) * _BLOCK
            build(room)
    except _StoreFull as full:  # (the index alone: with the rest, what it needs)
        raise _StoreFull(0, engine.max_bytes - room + full.used) from None
    _check_room(engine, end, converted)


def _check_room(engine: _Engine, end: int, converted: bool, expiring: int = 0) -> None:
    """Refuse, before anything is written, a store that needs more than
    max_bytes (it was filled under a larger one): .dat up to `end`, the
    end of its last record, then .idx (once built: a bulk build takes no
    more pages than the same keys added one by one) and the room the
    engine keeps for the snapshot, with so many more expiring keys than it
    holds now (see engine.used), but for what it keeps in reserve: the
    free map's byte a block and room for spilled index entries. A store
    `converted` from version 2 or 3 needs only its files to fit: they kept
    no such room, and a full one would not open at its own cap. A store
    over max_bytes by no more than that opens, takes no create until
    deletes make room, and closes without a snapshot (see engine.close),
    as a crash does."""
    needed = max(_blocks(end), 1) * _BLOCK + engine.index.room()
    if not converted:
        needed += (engine._snapshot_room(expiring) - _blocks(engine.dat_size)
                   - 12 * _SPILL_ROOM)
    if needed > engine.max_bytes:
        raise _StoreFull(0, needed)


def _scan(engine: _Engine, index: dict[bytes, int]
          ) -> tuple[list[tuple[int, int]], dict[int, int], int]:
    """Read every valid item of .dat into `index` (newest copy of each key).

    Returns the older copies (block, blocks), the free markers (block ->
    blocks) and the highest sequence number seen. Value records are checked
    a chunk at a time, in bulk (see _values); free markers one by one.
    """
    newest = 0
    losers: list[tuple[int, int]] = []
    marked: dict[int, int] = {}
    for first, buf, starts in _chunks(engine.dat, engine.dat_size, _HEAD.size):
        columns = _head_columns(buf, starts)
        chosen = list(map(_VALUE_WORDS.__contains__, columns[0]))
        values = _values(first, buf, starts, columns, chosen)
        if values is None:  # one or more is not valid: leave those out
            chosen = [ok and _is_value(buf, off) for ok, off in zip(chosen, starts)]
            values = _values(first, buf, starts, columns, chosen)
            assert values is not None  # the same checks, passed one by one
        keys, slots, seqs = values
        indexed = list(map(index.setdefault, keys, slots))
        if indexed != slots:  # some key has another copy
            for key, slot, seq, other in zip(keys, slots, seqs, indexed):
                if other != slot:
                    _choose(engine, index, key, slot, seq, losers)
        newest = max(newest, max(seqs, default=0))
        for off in compress(starts, map(_MARKER_WORD.__eq__, columns[0])):
            item = _parse_item(buf, off)
            if item is not None:
                marked[first + off // _BLOCK] = item[4]
    return losers, marked, newest


def _choose(engine: _Engine, index: dict[bytes, int], key: bytes, slot: int, seq: int,
            losers: list[tuple[int, int]]) -> None:
    """Of a copy of key (its slot and seq) and the one indexed now, index
    the one with the higher sequence number; add the other to losers."""
    old = index[key]
    old_seq = _HEAD.unpack(_read_at(engine.dat, _HEAD.size, _slot_block(old) * _BLOCK))[4]
    if seq > old_seq:
        index[key] = slot
    loser = old if seq > old_seq else slot
    losers.append((_slot_block(loser), _blocks(_slot_size(loser))))


def _unexplained(engine: _Engine, items: dict[int, int]) -> list[tuple[int, int]]:
    """The regions (block, blocks) of the free extents that no item the
    scan found (a free marker or an older copy, as block -> blocks)
    covers: a torn write, or damage."""
    damage = []
    for start, length in engine.free.extents():
        at, end = start, start + length
        while at < end:
            if at in items:
                at += items[at]
            else:
                region = at
                while at < end and at not in items:
                    at += 1
                damage.append((region, at - region))
    return damage


def _report_damage(engine: _Engine, damage: list[tuple[int, int]], closed: bool,
                   listed: Optional[int]) -> None:
    """Say what recovery skipped. A crash tears at most the one record
    (or free marker) being written: more than that is damage, a warning.
    So is any scan of a store closed cleanly: if the number of keys it held
    is known (`listed`), the ones the scan did not find are lost, and
    engine.lost keeps their number for check() to say."""
    skipped = sum(length for _, length in damage) * _BLOCK
    if closed:
        engine.lost = max(0, (listed or 0) - engine.index.count)
        lost = ("how many keys were lost cannot be told, as its .idx is missing or "
                "damaged too" if listed is None else f"lost {engine.lost} key(s)")
        _log.warning(
            "datastore %s was closed cleanly, but its files do not match the "
            "snapshot close wrote: they were damaged since. Recovered %d keys by "
            "scanning; %s; skipped %d damaged region(s) of %d bytes in all",
            engine.dat_path[:-4], engine.index.count, lost, len(damage), skipped)
    elif len(damage) > 1 or any(length > _MAX_BLOCKS for _, length in damage):
        _log.warning(
            "datastore %s: recovered %d keys; skipped %d damaged region(s) "
            "of %d bytes in all, which a crash alone does not explain",
            engine.dat_path[:-4], engine.index.count, len(damage), skipped)
    else:
        _log.info("datastore %s: recovered %d keys after a crash%s",
                  engine.dat_path[:-4], engine.index.count,
                  f"; skipped {skipped} bytes of a torn write" if damage else "")


# --- Reading .dat in bulk: a scan, and the heads the index points at -------

def _chunks(fd: int, size: int, head: int, step: int = _BLOCK
            ) -> Iterator[tuple[int, bytes, range]]:
    """.dat after the header, a chunk at a time: (block, buffer, starts),
    where the buffer holds the file from that block on, and `starts` are the
    offsets in it of the chunk's multiples of `step` bytes in the file
    (blocks, by default) that hold a whole head of `head` bytes. The buffer
    holds at least _MAX_RECORD bytes from each of those, or up to the end of
    the file."""
    pos = _BLOCK
    while pos < size:
        buf = _read_at(fd, min(_SCAN_CHUNK + _MAX_RECORD, size - pos), pos)
        yield pos // _BLOCK, buf, range(-pos % step, min(_SCAN_CHUNK, len(buf) - head + 1), step)
        pos += _SCAN_CHUNK


def _head_columns(buf: bytes, starts: range) -> list[Sequence[int]]:
    """The heads at `starts` in buf, as four columns of 64-bit little-endian
    numbers: magic, kind, key length and 0; sequence number; expires_at;
    length and CRC-32. Read in bulk, through a memoryview (with no copy
    where the machine is little-endian): far faster than head by head."""
    if not starts:
        return [[], [], [], []]
    size = starts[-1] + _HEAD.size
    if sys.byteorder == "little":
        words: Sequence[int] = memoryview(buf)[:size].cast("Q")
    else:  # as the machine reads them, then byte-swapped
        swapped = array("Q", buf[:size])
        swapped.byteswap()
        words = swapped
    return [words[i::_BLOCK // 8] for i in range(_HEAD.size // 8)]


def _head_word(kind: int, key_len: int) -> int:
    return int.from_bytes(_MAGIC + bytes((kind, key_len, 0, 0)), "little")


# What the first column of a valid head can hold (see _head_columns).
_VALUE_WORDS = frozenset(_head_word(_VALUE, n) for n in range(1, _MAX_KEY_BYTES + 1))
_MARKER_WORD = _head_word(_FREE, 0)


def _values(first: int, buf: bytes, starts: range, columns: list[Sequence[int]],
            chosen: list[bool]) -> Optional[tuple[list[bytes], list[int], list[int]]]:
    """The keys, slots and sequence numbers of the chosen value records of a
    chunk (see _chunks; `columns` are their heads, from _head_columns, and
    the first column of each is in _VALUE_WORDS); or None if any one of them
    is not valid. The checks are _parse_item's and _valid_key's, made for
    all the records at once, which is several times faster than one by one."""
    offs = list(compress(starts, chosen))
    if not offs:
        return [], [], []
    tags, seqs, exps, tails = (list(compress(column, chosen)) for column in columns)
    key_lens = [tag >> 40 for tag in tags]
    lengths = [tail & 0xFFFFFFFF for tail in tails]
    ends = [off + _HEAD.size + key_len + length
            for off, key_len, length in zip(offs, key_lens, lengths)]
    if (max(seqs) >= _MAX_SEQ or max(exps) > _LATEST_EXPIRY_BITS
            or max(lengths) > MAX_VALUE_BYTES or max(ends) > len(buf)):
        return None
    crc32 = zlib.crc32
    if [crc32(buf[off + _HEAD.size:end], crc32(buf[off:off + _FIELDS.size]))
            for off, end in zip(offs, ends)] != [tail >> 32 for tail in tails]:
        return None
    keys = [buf[off + _HEAD.size:off + _HEAD.size + key_len]
            for off, key_len in zip(offs, key_lens)]
    if not _valid_keys(keys):
        return None
    slots = [end - off | (first + off // _BLOCK) << _BLOCK_SHIFT | exp << _EXP_SHIFT
             for off, end, exp in zip(offs, ends, exps)]
    return keys, slots, seqs


def _is_value(buf: bytes, off: int) -> bool:
    item = _parse_item(buf, off)
    return item is not None and item[0] == _VALUE and _valid_key(item[2])


_HEADS_CHUNK = 1 << 22  # bytes of .dat read at a time to list the keys
_KEY_HEAD = struct.Struct("<4sBB10xQ")  # the fields of a head that list a key
_KEY_END = _HEAD.size + _MAX_KEY_BYTES  # where the longest key ends in its record


def _indexed_heads(engine: _Engine) -> tuple[list[bytes], list[int], list[int]]:
    """The key, expiry bits and place of every indexed record, in .dat's
    order, which is read a few MiB at a time. (The loop that lists a
    million keys: its names are local, and the cycle collector, which
    would walk the growing lists again and again, waits.)"""
    keys: list[bytes] = []
    exps: list[int] = []
    places = sorted(engine.index.places())  # (by block: see format)
    add_key, add_exp, unpack, read, fd = keys.append, exps.append, \
        _KEY_HEAD.unpack_from, _read_at, engine.dat
    buf, at, end = b"", 0, 0  # .dat from byte `at` to `end`
    collecting = gc.isenabled()
    gc.disable()
    try:
        for place in places:
            pos = (place >> 16) * _BLOCK
            if pos + _KEY_END > end:
                buf, at = read(fd, _HEADS_CHUNK, pos), pos
                end = pos + len(buf)
            off = pos - at
            magic, kind, key_len, exp = unpack(buf, off) if end - pos >= _HEAD.size \
                else (b"", 0, 0, 0)
            if magic != _MAGIC or kind != _VALUE:
                raise CorruptStoreError(f"a record of {engine.dat_path} that "
                                        f"{engine.idx_path} lists is damaged",
                                        path=engine.dat_path)
            add_key(buf[off + _HEAD.size:off + _HEAD.size + key_len])
            add_exp(exp)
    finally:
        if collecting:
            gc.enable()
    return keys, exps, places


# --- legacy.py ---------------------------------------------------------------
# Stores written by versions 1.0 to 3, converted in place at their first open.
#
# Versions 2 and 3 wrote this version's records (see format) at 512-byte
# boundaries, under the magic "DSr2", and 2.0 also its index as a record of
# kind 3 (base64 text) at each close. Their heads are given this version's
# magic in place (``_upgrade``), and then the store is read as after a crash.
#
# A 1.0 ``.dat`` starts with a header (``_V1_HEADER``: magic "DataStr1",
# state, sequence number, and two CRC-checked fields) and holds records at
# 512-byte boundaries, each with a head (``_V1_HEAD``): magic "DSr1", kind (1
# a value, 2 a tombstone), key length, (unused), expires_at as a float64, body
# length, CRC-32 of the head before it, the key and the body. The newest
# record of a key, the one at the highest offset, is the key's state. Each
# value is copied as a record of this version (``_convert_v1``).

_V1_HEADER = struct.Struct("<8sB3xQII")
_V1_HEADER_MAGIC = b"DataStr1"
_V1_HEAD = struct.Struct("<4sBBBxdII")
_V1_MAGIC = b"DSr1"
# Records copied between fsyncs, before their originals are invalidated.
_CONVERT_BATCH = 256
# Where versions 1.0 to 3 started records, and 2 and 3's magic.
_OLD_BLOCK, _OLD_MAGIC = 512, b"DSr2"


def _written_by_2_or_3(engine: _Engine) -> bool:
    """For a .dat whose header is not valid: whether it holds values of
    versions 2 or 3, and this version's at 512-byte boundaries only, as a
    conversion cut short leaves them (this version writes elsewhere too)."""
    return (any(item[0] == _VALUE for _, item in _items_at(engine, _OLD_MAGIC, _OLD_BLOCK))
            and not any(pos % _OLD_BLOCK for pos, item in _items_at(engine, _MAGIC, _BLOCK)
                        if item[0] == _VALUE))


def _upgrade(engine: _Engine) -> None:
    """Give each valid value record of versions 2 and 3 this version's
    magic, in place, and mark the free blocks after it, up to the next
    512-byte boundary. Those records are read at 512-byte boundaries only:
    a key crosses 64-byte ones, and one that holds such a head is no record.
    Any other head under their magic (a free marker, 2.0's index table, a
    torn write: its kind, below 0x20, tells it from a value's JSON text)
    loses the magic, so that no version 3 finds anything of its own in the
    store once converted, and none mistakes the store for one of its own.
    Recovery marks the free space anew. A chunk at a time, the bytes from
    its first head changed to its last are written at once (the rest as
    they were). The header stays until the store is read, so a crash here
    converts again; what this wrote is fsynced first."""
    size = os.fstat(engine.dat).st_size
    upgraded = False
    for first, buf, starts in _chunks(engine.dat, size, _HEAD.size, _OLD_BLOCK):
        image, lo, hi = bytearray(buf), len(buf), 0
        for off in starts:
            if not buf.startswith(_OLD_MAGIC, off) or buf[off + 4] >= 0x20:
                continue  # (a kind is below 0x20, and JSON text never is)
            lo, hi = min(lo, off), max(hi, off + _HEAD.size)
            item = _parse_item(buf, off, _OLD_MAGIC)
            if item is None or item[0] != _VALUE or not _valid_key(item[2]):
                image[off:off + len(_OLD_MAGIC)] = bytes(len(_OLD_MAGIC))
                continue
            fields = _MAGIC + buf[off + 4:off + _FIELDS.size]
            crc = zlib.crc32(buf[off + _HEAD.size:off + item[5]], zlib.crc32(fields))
            image[off:off + _HEAD.size] = fields + crc.to_bytes(4, "little")
            end = off + _blocks(item[5]) * _BLOCK  # (in buf) its blocks' end, and the gap's
            gap = -(first * _BLOCK + end) % _OLD_BLOCK
            if gap and end + _HEAD.size <= len(buf) and first * _BLOCK + end + gap <= size:
                image[end:end + _HEAD.size] = _free_marker(gap // _BLOCK)
                hi = end + _HEAD.size
        if hi:
            _write_at(engine.dat, bytes(image[lo:hi]), first * _BLOCK + lo)
            upgraded = True
    if upgraded:
        _fsync(engine.dat)


def _is_v1_header(data: bytes) -> bool:
    return (len(data) >= _V1_HEADER.size and data.startswith(_V1_HEADER_MAGIC)
            and zlib.crc32(data[:_V1_HEADER.size - 4])
            == int.from_bytes(data[_V1_HEADER.size - 4:_V1_HEADER.size], "little"))


def _convert_v1(engine: _Engine, old_dir: str) -> None:
    """Convert a store written by version 1.0, in place.

    The 1.0 header stays until the end, so a crash here converts again: a
    key's record of a later version, if any, beats its 1.0 records; else its
    1.0 record at the highest offset wins, as it did in 1.0 (a tombstone
    there means deleted). Each 1.0 value is copied as a record of this version,
    then invalidated; superseded 1.0 records go before tombstones, which
    until then hide them.
    """
    for leftover in (".bak", ".compact.dat", ".compact.dir", ".compact.bak"):
        _remove(engine.dat_path[:-4] + leftover)  # 1.0's own temporary files
    # 1.0's .dir, its snapshot of .dat, is not read: .dat says it all. Emptied
    # first, since the room the conversion may use counts .dat and .idx only
    # (and removed once the store is converted, see opening).
    if os.path.isfile(old_dir):
        os.truncate(old_dir, 0)
    engine.dat_size = os.fstat(engine.dat).st_size
    newest: dict[bytes, tuple[int, int, float, Optional[bytes]]] = {}
    older: list[tuple[int, int]] = []
    for first, buf, starts in _chunks(engine.dat, engine.dat_size, _V1_HEAD.size, _OLD_BLOCK):
        for off in starts:
            if not buf.startswith(_V1_MAGIC, off):
                continue
            block = first + off // _BLOCK
            _, kind, key_len, _, expires_at, body_len, crc = _V1_HEAD.unpack_from(buf, off)
            key_at = off + _V1_HEAD.size
            end = key_at + key_len + body_len
            if kind not in (1, 2) or end > len(buf) or zlib.crc32(
                    buf[key_at:end], zlib.crc32(buf[off:key_at - 4])) != crc:
                continue
            key = buf[key_at:key_at + key_len]
            if key in newest:
                older.append(newest[key][:2])
            newest[key] = (block, _blocks(end - off), expires_at,
                           buf[key_at + key_len:end] if kind == 1 else None)
    found: dict[bytes, int] = {}
    _upgrade(engine)  # the copies of a conversion by 2.0 or 3 cut short
    losers, marked, seq = _scan(engine, found)  # and of one by this version
    engine.seq = seq + 1
    engine.lease = _MAX_SEQ  # no header write: the 1.0 header stays until the end
    tombstones, convert = [], {}
    for key, (block, length, expires_at, body) in newest.items():
        if key in found:
            older.append((block, length))
        elif body is None:
            tombstones.append((block, length))
        elif (not _valid_key(key) or len(body) > MAX_VALUE_BYTES
              or not 0 <= expires_at <= _LATEST_EXPIRY):
            raise _damaged(engine.dat_path, f"bad 1.0 record {key!r}")
        else:
            convert[key] = (block, length, expires_at, body)
    # Each invalidation waits until what supersedes it is durable: the newer
    # copies before the older ones go, and those before the tombstones.
    for superseded in (losers + older, tombstones):
        if superseded:
            _fsync(engine.dat)
        for block, length in superseded:
            engine._write_marker(block, length)
    holders = {b"\0" + key: _slot(length * _BLOCK, block)  # hold their blocks
               for key, (block, length, _, _) in convert.items()}
    found.update(holders)
    _index_found(engine, found, [], marked)
    copied: list[tuple[int, int]] = []  # originals whose copies are not yet durable

    def release() -> None:
        _fsync(engine.dat)  # the copies, before their originals are invalidated
        for block, length in copied:
            engine._write_marker(block, length)
            engine.free.add(block, length)
        copied.clear()

    for key, (block, length, expires_at, body) in convert.items():
        engine.index.remove(_hash(b"\0" + key), holders[b"\0" + key])
        engine._count(length, -1)
        try:
            engine._put_record(key, body, expires_at, None, None)
        except _StoreFull:  # (making room in .idx at most: nothing written)
            if not copied:
                raise
            release()  # the originals' room
            engine._put_record(key, body, expires_at, None, None)
        copied.append((block, length))
        if len(copied) == _CONVERT_BATCH:
            release()
    release()  # and the copies reach the disk before the new header


# --- compaction.py -----------------------------------------------------------
# Moving records down, and compact(): the smallest layout the records allow.
#
# A create that finds no room in the cap moves a few records from the end of
# ``.dat`` into free extents lower down (``_move_down``), which is all it
# takes while the free extents are no smaller than the records at the end.
# When a record at the end fits no free extent (say one 16 KiB value, with
# free extents of a block or two between small records), moving stops,
# however much is free.
#
# So after moving what it can that way, ``compact()`` sweeps the records
# above the lowest free extent, in order of their blocks: a batch at a time,
# it appends copies of them to the end of ``.dat`` (within ``max_bytes``),
# fsyncs once, and only then marks the originals free, where they join the
# free extents around them into one; the moves from the end then bring the
# copies back down into that space. It stops once fewer blocks are free than
# a sixteenth of .dat's plus one largest record, so a store with little to
# gain costs one pass over the index, and a record is copied at most twice.

_SWEEP_BATCH = 1024  # records copied to the end between fsyncs


def _compact(engine: _Engine) -> None:
    _settle(engine)
    try:  # in as few pages as it needs, spilling none it need not
        engine.index.rebuild(engine.index_room(engine.dat_size))
    except _StoreFull:
        pass  # even so, no room for the pages: it stays as it is
    lowest = engine.free.lowest()
    if _small_enough(engine) or lowest is None:
        return
    order = sorted(place for place in engine.index.places() if _slot_block(place) > lowest)
    at = 0
    while at < len(order) and not _small_enough(engine):
        batch: list[tuple[bytes, int]] = []  # (key, the original's slot)
        while at < len(order) and len(batch) < _SWEEP_BATCH:
            slot = order[at]
            block = _slot_block(slot)
            record = _read_at(engine.dat, _slot_size(slot), block * _BLOCK)
            item = _parse_item(record, 0)
            # (a damaged record fails _parse_item, and stays put)
            if (item is not None and item[0] == _VALUE and item[5] == len(record)
                    and slot in engine.index.find(_hash(item[2]))):  # not moved since
                if engine.used() + engine._growth(_slot_size(slot)) > engine.max_bytes:
                    break  # no room for another copy now: settle this batch first
                try:
                    batch.append((item[2], engine._copy(
                        item[2], record, _blocks(engine.dat_size), block)))
                except OSError:  # the originals of the copies made stay valid:
                    engine.stale.extend(batch)  # the next write invalidates them
                    raise
            at += 1
        if not batch:
            break
        _free_originals(engine, batch)
        _settle(engine)


def _free_originals(engine: _Engine, batch: list[tuple[bytes, int]]) -> None:
    """Make the copies durable, then free their originals."""
    try:
        engine._sync()
    except OSError:
        engine.stale.extend(batch)  # invalidated by the next write, as any stale copy
        raise
    for done, (key, old) in enumerate(batch):
        try:
            engine._write_marker(_slot_block(old), _blocks(_slot_size(old)))
        except OSError:
            engine.stale.extend(batch[done:])
            raise
        engine.free.add(_slot_block(old), _blocks(_slot_size(old)))


def _settle(engine: _Engine) -> None:
    """Move records from the end into free extents while they fit; truncate."""
    engine._trim()
    while engine._move(1024):
        pass
    engine._trim()


def _small_enough(engine: _Engine) -> bool:
    """Fewer free blocks than a sixteenth of .dat's and one largest record.
    (One a key, as it was, let a store of 64-byte records stay half free.)"""
    return engine.free.blocks < _blocks(engine.dat_size) // 16 + engine.largest


def _move_down(engine: _Engine, limit: int) -> int:
    """Move up to `limit` records from the end of .dat into free extents
    nearer the start, then truncate them away. Returns how many moved.

    The copies are fsynced before the originals go if any original was
    durable. If truncating fails, free markers invalidate the originals;
    if anything fails before, the originals wait on the stale list.
    """
    engine._trim()
    moved: list[tuple[bytes, int]] = []
    passed: list[tuple[int, int]] = []  # free extents above the records moved
    durable = False
    end = _blocks(engine.dat_size)

    def unpass() -> None:  # .dat still holds them: back into the free map
        for start, length in passed:
            engine.free.add(start, length)

    try:
        while len(moved) < limit:
            start = engine.free.start_before(end)
            if start is not None:  # out of the free map: no copy may land there
                passed.append((start, engine.free.remove(start)))
                end = start
            found = _last_record(engine, end)
            if found is None:
                break
            key, block, seq, record = found
            blocks = _blocks(len(record))
            target = engine._fitting(blocks)
            if target is None or target >= block:  # (none is above: passed ones left)
                break
            moved.append((key, engine._copy(key, record, target, block)))
            durable = durable or seq < engine.durable_seq
            end = block
        if durable:
            engine._sync()
    except OSError:
        engine.stale.extend(moved)
        unpass()
        raise
    if not moved:
        unpass()
        return 0
    try:
        os.ftruncate(engine.dat, end * _BLOCK)
    except OSError:
        unpass()
        for key, old in moved:  # the originals stay: invalidate each
            engine._supersede(key, old)
    else:
        engine.dat_size = end * _BLOCK
    return len(moved)


def _last_record(engine: _Engine, end: int) -> Optional[tuple[bytes, int, int, bytes]]:
    """(key, block, seq, record) of the live record that ends at block
    `end`, read from disk, or None if none does."""
    found = _item_before(engine.dat, end)
    if found is None:
        return None
    first, buf, (kind, seq, key, _, _, total) = found
    if (kind == _VALUE and first + _blocks(total) == end
            and _slot(total, first) in engine.index.find(_hash(key))):
        return key, first, seq, buf[:total]
    return None


# --- opening.py --------------------------------------------------------------
# Opening a store: from the files on disk to an engine ready for calls.
#
# A new store's .dat is made whole first (see format's _create_data_file);
# then .dat is opened and locked (locks), a creator's leftover temporary file
# removed, and the index loaded: from .idx after a clean close (snapshot), by
# a scan after a crash (recovery), or by converting a store written by
# version 1.0, 2 or 3 (legacy). Only then is the header marked open, before
# anything else is written.

def _open(engine: _Engine, deadline: Optional[float]) -> None:
    """See _Engine.open."""
    _engines.add(engine)  # a fork from now on closes the child's copies
    try:
        new = not os.path.exists(engine.dat_path)
        if new:
            _create_data_file(engine.dat_path, engine.idx_path)
        engine.files.append(_open_regular(engine.dat_path))
        engine.dat = engine.files[-1].fileno()
        _lock_data_file(engine.dat, engine.dat_path, deadline)
        name = os.path.basename(engine.dat_path)
        for leftover in glob.glob(glob.escape(engine.dat_path) + ".*.new"):
            if re.fullmatch(re.escape(name) + r"\.\d+\.new", os.path.basename(leftover)):
                _remove(leftover)  # of a creator killed before it could (see format)
        _load(engine)
        if new:  # .idx and .lock too: so that sync() covers their names
            _fsync_folder(os.path.dirname(engine.dat_path))
    except BaseException:
        engine.close_files()
        raise


def _load(engine: _Engine) -> None:
    """Read the index: from .idx after a clean close, else by scanning .dat
    (see recovery); convert a store of version 1.0, 2 or 3. Then mark the
    header open, before anything else is written."""
    size = os.fstat(engine.dat).st_size
    first = _read_at(engine.dat, min(size, _HEADER.size), 0)
    header = _Header.parse(first)
    v1 = header is None and _is_v1_header(first)
    old_dir = engine.dat_path[:-4] + ".dir"  # of a 1.0 or 2.0 store: removed once converted
    engine.files.append(_open_regular(engine.idx_path))
    engine.index.fd = engine.files[-1].fileno()
    # A store that holds no record leaves .dat one header, or one block (of
    # this version or an older one), long, zero after the header, beside an
    # index of no key: with the header torn by a power cut, it is that, not
    # a foreign file.
    torn = (size in (_HEADER.size, _BLOCK, _OLD_BLOCK)
            and _keys_saved(engine.index.fd) in (0, None) and not os.path.exists(old_dir)
            and not _read_at(engine.dat, size, 0)[_HEADER.size:].strip(b"\0"))
    if (size and header is None and not v1 and not torn and not _holds_records(engine)
            and not _holds_records(engine, _OLD_MAGIC, _OLD_BLOCK)):
        raise CorruptStoreError(
            f"{engine.dat_path} is not a datastore data file (no valid header "
            "or record); move it away or open a different path",
            path=engine.dat_path)
    if not size and _keys_saved(engine.index.fd):
        raise CorruptStoreError(
            f"{engine.dat_path} is empty but {engine.idx_path} is not; "
            "restore the data file or move the index away", path=engine.dat_path)
    gc_was_on = gc.isenabled()
    gc.disable()  # loading makes millions of objects, none of them cyclic
    try:
        if v1:
            _convert_v1(engine, old_dir)
        elif header is None or not _load_snapshot(engine, header):
            version = header.version if header else 3 if _written_by_2_or_3(engine) else 4
            if version < 4:
                _upgrade(engine)
            listed = _keys_saved(engine.index.fd, header.stamp) if header else None
            _recover(engine, header, listed, version if version < 4 else None)
    finally:
        if gc_was_on:
            gc.enable()
    engine.lease = engine.seq + _LEASE
    engine._write_header(_OPEN)  # before anything else is written
    engine.durable_seq = engine.seq
    if os.path.exists(old_dir):
        _remove(old_dir)
        _fsync_folder(os.path.dirname(engine.dat_path))
    engine._try(engine._trim)


# --- engine.py ---------------------------------------------------------------
# The storage engine: records and free space in .dat, the index in .idx.
#
# The index (see index) maps a hash of each key to the place of its record;
# the key itself is checked against the record. The store keeps in memory the
# free extents (by start, by end and by size, merged with free neighbours),
# the records that have a ttl in order of expiry, and the sizes of the files.
# It changes them only after the bytes are written. The index file is not
# kept in step on disk while the store is open: after a crash it is rebuilt
# from .dat (see recovery).
#
# * ``create`` takes the best-fitting free extent, or appends to ``.dat``. If
#   it splits an extent, it first writes a free marker for the remainder. The
#   write of the record is the *commit point*: from then on the key exists.
#   It leaves room in ``max_bytes`` for a copy of the largest record, which a
#   ``set`` replacing a record with one no larger may use, and for 64 spilled
#   index entries (see index): so at the cap a delete makes room for a create
#   of its size (while no more are spilled).
# * ``set`` of a live key writes the new record the same way (its commit
#   point), then a free marker over the old one. If the old record was
#   durable (see below), the new one is fsynced first.
# * ``delete`` writes a free marker over the record's head: that write is the
#   commit point. The blocks join the free extents. (If the write fails part
#   way, the head is written back, so a failed delete leaves the value.)
# * An expired key costs nothing when it expires. Each write then reclaims a
#   few expired keys, earliest first, by writing a free marker over each (so a
#   reclaimed key can never come back, even if the clock is set back).
# * Free space at the end of ``.dat`` is given back by truncating the file.
#   Free space lower down waits for the creates that fit in it: a delete
#   moves no records (that cost a delete more than twice its own work, for a
#   file that the next creates fill again). A create that finds no room in the cap
#   moves up to 64 records from the end of ``.dat`` into free extents nearer
#   the start: it writes the copies (with new sequence numbers), then
#   truncates the originals away. ``compact()`` moves all it can, at once.
#
# Any work after a commit point (freeing, moving, truncating) that fails is
# left for a later call: the call itself has succeeded.

# Work a single call may do besides its own: expired keys reclaimed after a
# write, and, when a create needs the room, more of them and records moved
# toward the start of .dat (one fsync covers a batch).
_RECLAIM_BATCH = 16
_MOVE_FOR_ROOM = 64


class _Engine:
    """The files of one store: records and free space in .dat, the index in .idx.

    It deals in bytes keys, records, 64-byte blocks and file descriptors,
    held open for the store's life and never reopened by name; it holds the
    flock on .dat. It knows no threads, clocks or users: the caller serialises
    every call and passes the time where expiry matters. See the module
    docstring for the format and the crash argument.
    """

    def __init__(self, base: str, max_bytes: int) -> None:
        """The engine of the store `base`, not yet open: see open()."""
        self.dat_path, self.idx_path = base + ".dat", base + ".idx"
        self.max_bytes = max_bytes
        self.index = _Index(-1, self.idx_path)  # hash of key -> place (see index)
        self.expiries = _Expiries()             # records that have a ttl
        self.free = _FreeSpace()                # blocks no record holds
        self.dat_size = 0     # bytes of .dat, from what was written
        self.seq = 1          # the next sequence number
        self.lease = 0        # the header's bound on sequence numbers issued
        self.durable_seq = 0  # records below this number have been fsynced
        self.stale: list[tuple[bytes, int]] = []  # superseded copies to invalidate
        self.failed: Optional[OSError] = None     # a failed fsync: no more writes
        self.by_blocks = [0] * (_MAX_BLOCKS + 1)  # indexed records by blocks taken
        self.largest = 0      # blocks of the largest indexed record
        self.lost = 0         # keys a damaged store had that its scan did not find
        self.moves = 0        # records moved so far (see _put_record)
        self.credit = 0       # room at the last count of used(), less writes since (0: none)
        self.busy = False     # a write is running, or was cut short (see _unit)
        self.changed = True   # written to since open: close() saves .idx (see snapshot)
        self.forked = False   # this is a child's copy, made by fork() (see locks)
        self.stamp = 0        # what the last clean close wrote in both headers (snapshot)
        self.closing = False  # close() has begun
        self.dat = -1         # the descriptor of .dat, once open (.idx's: index.fd)
        self.files: list[io.FileIO] = []  # which own them

    def open(self, deadline: Optional[float] = None) -> _Engine:
        """Open and lock the files (waiting for the lock until `deadline` at
        most) and load the index (see opening); returns self. The files are
        closed if it raises. (Apart from __init__, so that the caller holds
        the engine, and can close its files, before any is open.)"""
        _open(self, deadline)
        return self

    # --- Reading ---

    def lookup(self, key: bytes) -> Optional[int]:
        """key's slot, expired or not, or None."""
        found = self._find(key)
        return None if found is None else found[0]

    def _find(self, key: bytes) -> Optional[tuple[int, bytes]]:
        """(slot, head) of key's record, expired or not, or None: of the
        index's candidates, the one whose record's head holds key (one read
        of it, if any; the head is the record's first bytes, up to the key's
        end)."""
        for place in self.index.find(_hash(key)):
            head = _read_at(self.dat, _HEAD.size + len(key), (place >> 16) * _BLOCK)
            if head[_HEAD.size:] == key and head[4] == _VALUE and head[5] == len(key):
                return place | int(_HEAD.unpack_from(head)[5]) << _EXP_SHIFT, head
        return None

    def slot(self, key: bytes, now: float) -> Optional[int]:
        """key's slot if it has a live record at `now`, else None."""
        slot = self.lookup(key)
        if slot is None:
            return None
        exp = _slot_exp(slot)
        return None if exp and exp <= _float_bits(now) else slot

    def expires_at(self, key: bytes, now: float) -> Optional[float]:
        """expires_at of key's live record (0.0 for never), or None."""
        slot = self.slot(key, now)
        return None if slot is None else _bits_float(_slot_exp(slot))

    def count(self, now: float) -> int:
        """The number of live keys at `now`. No I/O."""
        return self.index.count - self.expiries.count_due(_float_bits(now))

    def keys(self, now: float) -> list[bytes]:
        """The live keys at `now`, in no particular order. O(keys), reading
        each record's head."""
        now_bits = _float_bits(now)
        keys, exps, _ = _indexed_heads(self)
        return [key for key, exp in zip(keys, exps) if not exp or exp > now_bits]

    def get(self, key: bytes, now: float) -> Optional[bytes]:
        """The body of key's live record, or None. One read of .dat. (The
        checks are _parse_item's, made here at once.)"""
        for place in self.index.find(_hash(key)):
            record = _read_at(self.dat, place & 0xFFFF, (place >> 16) * _BLOCK)
            start = _HEAD.size + len(key)
            if record[_HEAD.size:start] != key or record[5] != len(key):
                continue  # another key's, with the same hash
            magic, kind, _, zero, seq, exp, length, crc = _HEAD.unpack_from(record)
            if (magic != _MAGIC or kind != _VALUE or zero or seq >= _MAX_SEQ
                    or exp > _LATEST_EXPIRY_BITS or start + length != len(record)
                    or zlib.crc32(record[_HEAD.size:], zlib.crc32(record[:_FIELDS.size]))
                    != crc):
                raise CorruptStoreError(
                    f"the record of {key.decode('utf-8', 'replace')!r} in "
                    f"{self.dat_path} is damaged", path=self.dat_path)
            return None if exp and exp <= _float_bits(now) else record[start:]
        return None

    def records(self) -> Iterator[tuple[bytes, Optional[bytes]]]:
        """(key, body) for every indexed record, expired or not, read from
        disk; body None if the record is damaged. O(keys)."""
        keys, _, places = _indexed_heads(self)
        for key, place in zip(keys, places):
            yield key, _value_body(_read_at(self.dat, place & 0xFFFF, (place >> 16) * _BLOCK),
                                   key)

    def used(self) -> int:
        """Bytes the files hold or may need at close: .dat (in whole blocks, so
        that the padding before an append is counted already), and .idx with
        what a close appends to it."""
        return _blocks(self.dat_size) * _BLOCK + max(self.index.size(), self.index.room()
                                                     + self._snapshot_room())

    def index_room(self, end: int) -> int:
        """Bytes a rebuilt .idx may take, with 12 a spilled entry (see index.build),
        if .dat ends at `end`, and room kept for _SPILL_ROOM more besides."""
        return self.max_bytes - max(_blocks(end), 1) * _BLOCK - _snapshot_room(
            0, self.expiries.count, _SPILL_ROOM, _blocks(self.dat_size))

    def _snapshot_room(self, expiring: int = 0, spill: int = 0) -> int:
        """Room for the snapshot, with so many more expiring keys and spilled
        entries (room is kept for _SPILL_ROOM at least). The free map takes a
        byte a block of .dat (which an append counts: see _place). The free
        extents' keys take none: a close saves them only if they fit (see
        snapshot), so a delete, which may add one, never needs room."""
        spilled = sum(map(len, self.index.spilled.values())) if self.index.spilled else 0
        return _snapshot_room(0, self.expiries.count + expiring,
                              max(spilled + spill, _SPILL_ROOM), _blocks(self.dat_size))

    # --- Writing ---

    @_unit
    def put(self, key: bytes, body: bytes, expires_at: float, now: float,
            replace: bool = True) -> bool:
        """Make key's record one holding `body`, whether or not it has one
        (unless not `replace`: then, if key is live, return False and write
        nothing). Returns True.

        The new record is written before the old one is invalidated, so a
        crash leaves one or the other. A write must leave room in the cap for
        a copy of the largest record, unless it replaces a live record that
        takes as much room: that may use it.
        Raises _StoreFull (nothing written) if there is no room.
        """
        found = self._find(key)
        old = None if found is None else found[0]
        if found and _slot_exp(found[0]) and _slot_exp(found[0]) <= _float_bits(now):
            self._check_writable()
            self._drop(key, found[0], found[1])  # expired: its space may serve the new record
            self._try(self._trim)
            old = None
        elif old is not None and not replace:
            return False
        self._check_writable()
        old = self._put_record(key, body, expires_at, now, old)
        if old is not None:
            self._supersede(key, old)
        self._tidy(now)
        return True

    @_unit
    def remove(self, key: bytes, now: float) -> bool:
        """Delete key's live record; False if it has none."""
        found = self._find(key)
        if found is None:
            return False
        slot, head = found
        if _slot_exp(slot) and _slot_exp(slot) <= _float_bits(now):
            return False
        self._check_writable()
        self._drop(key, slot, head)
        self._tidy(now)
        return True

    def _check_writable(self) -> None:
        if self.failed is not None:
            raise OSError(
                f"an earlier fsync of {self.dat_path} failed ({self.failed}), so "
                "writes since may be lost; close the store and open it again")
        while self.stale:  # a superseded copy left valid must go first
            self._invalidate(self.stale[-1])
            self.stale.pop()

    def _put_record(self, key: bytes, body: bytes, expires_at: float,
                    now: Optional[float], old: Optional[int]) -> Optional[int]:
        """Write a new record for key, whose record now is `old` (its slot,
        or None), and point the index at it (the commit). Returns the slot
        of the record it replaces, if any: the caller must invalidate that
        one."""
        size = _HEAD.size + len(key) + len(body)
        blocks = _blocks(size)
        h = _hash(key)
        exp = _float_bits(expires_at) if expires_at else 0

        def extra(block: int) -> int:
            """Bytes .idx grows by (a bucket split or a spilled entry, an
            expiry to save at close), and room kept for a set(), unless this
            replaces a record no smaller: that may use the room."""
            grow = _PER_EXPIRY if exp else 0
            if spill:
                grow += self._snapshot_room(0, 1) - self._snapshot_room()
            if old is None:
                grow += 0 if spill else self.index.split_cost(h)
            elif blocks <= _blocks(_slot_size(old)) and (not exp or _slot_exp(old)):
                return grow
            if now is None:  # converting a 1.0 store: no set() to keep room for
                return grow
            return grow + max(self.largest, blocks) * _BLOCK

        moves, spill, far = self.moves, False, False
        if old is None and now is not None:  # a new key, far from the cap: no need to add
            block, grow = self._place(size)  # up used(), which grows by `grow` (see credit)
            grow += (_PER_EXPIRY if exp else 0) + self.index.split_cost(h)
            far = self.credit >= grow + _MAX_BLOCKS * _BLOCK  # (room for a set() kept)
        if far:
            self.credit -= grow
        else:
            try:
                block = self._allocate(size, extra, now)
            except _StoreFull:
                if old is not None or not self.index.split_cost(h):
                    raise
                spill = True  # no room for the page a split takes: the entry waits beside
                block = self._allocate(size, extra, now)
        if old is not None and self.moves != moves:  # making room may have moved it
            old = self.lookup(key)
        if old is None and not spill:
            self.index.make_room(h)
        record = _pack_value(self._next_seq(), key, exp, body)
        self._write_record(block, blocks, record)
        place = _slot(size, block)
        if old is None and spill:
            self.index.spill(h, place)
        elif old is None:
            self.index.add(h, place)
        else:
            self.index.replace(h, old & _SLOT_MASK, place)
        self._count(blocks, 1)
        if old is not None:
            self._count(_blocks(_slot_size(old)), -1)
            if _slot_exp(old):
                self._unexpire(_slot_exp(old), old & _SLOT_MASK)
        if exp:
            self.expiries.add(exp, place)
        return old

    def _count(self, blocks: int, change: int) -> None:
        """Count an indexed record of `blocks` blocks in (1) or out (-1)."""
        self.by_blocks[blocks] += change
        if change > 0:
            self.largest = max(self.largest, blocks)
        while self.largest and not self.by_blocks[self.largest]:
            self.largest -= 1

    def _allocate(self, size: int, extra: Callable[[int], int], now: Optional[float]) -> int:
        """Where to write a record of `size` bytes (see _place) such that the
        files stay within max_bytes with extra(block) more bytes (.idx,
        room kept).

        Tries reclaiming expired keys and moving records to make room, a
        bounded amount; raises _StoreFull if that is not enough.
        """
        for attempt in range(3):
            block, growth = self._place(size)
            needed = growth + extra(block)
            self.credit = self.max_bytes - self.used() - needed
            if self.credit >= 0:
                return block
            if attempt == 0 and now is not None:
                self._reclaim(now, _RECLAIM_BATCH * 4)
                self._try(self._trim)  # an expired last record
            elif attempt == 1:
                self._move(_MOVE_FOR_ROOM)
        raise _StoreFull(needed, self.used())

    def _place(self, size: int) -> tuple[int, int]:
        """(block, bytes used() grows by) for a record of `size` bytes: the
        start of the smallest free extent it fits, or the end of .dat (its
        blocks, and a byte each in the snapshot's free map)."""
        block = self._fitting(_blocks(size))
        if block is not None:
            return block, 0
        return _blocks(self.dat_size), self._growth(size)

    @staticmethod
    def _growth(size: int) -> int:
        """Bytes used() grows by when a record of `size` bytes is appended."""
        return _blocks(size) * (_BLOCK + 1)

    def _fitting(self, blocks: int) -> Optional[int]:
        """free.fitting(blocks); if the free extents loaded from .idx lie
        past what it can set right in passing, the store reads .dat again."""
        try:
            return self.free.fitting(blocks)
        except ValueError:
            self.index.damaged = True
            raise CorruptStoreError(f"{self.idx_path}: its free extents do not match its "
                                    "map of free blocks", path=self.idx_path) from None

    def _write_record(self, block: int, blocks: int, record: bytes) -> None:
        """Write record at block: into a free extent (splitting off and marking
        the rest first) or at the end of .dat. Memory changes only after."""
        length = self.free.length_at(block)
        if length is None:  # appending
            try:
                _write_at(self.dat, record, block * _BLOCK)
            except OSError:
                self._undo_append()
                raise
            self.dat_size = block * _BLOCK + len(record)
            return
        try:
            if length > blocks:
                self._write_marker(block + blocks, length - blocks)
            _write_at(self.dat, record, block * _BLOCK)
        except OSError:
            self._try(self._write_marker, block, length)  # it may be torn
            raise
        self.dat_size = max(self.dat_size, block * _BLOCK + len(record))  # a tail extent
        self.free.take(block, blocks)

    def _undo_append(self) -> None:
        """After a failed append, cut .dat back, or count what stayed as free."""
        try:
            os.ftruncate(self.dat, self.dat_size)
        except OSError:
            size = os.fstat(self.dat).st_size
            if size > self.dat_size:
                start = _blocks(self.dat_size)
                self.dat_size = size
                if _blocks(size) > start:
                    self.free.add(start, _blocks(size) - start)

    def _drop(self, key: bytes, slot: int, head: Optional[bytes] = None) -> None:
        """Delete key: a free marker over its record's head is the commit.

        If that write fails part-way, the head it was writing over (`head`,
        if the caller has read it) is put back, so that a failed delete
        leaves the record readable.
        """
        block, size = _slot_block(slot), _slot_size(slot)
        if head is None:
            head = _read_at(self.dat, _HEAD.size, block * _BLOCK)
        head = head[:_HEAD.size]
        try:
            self._write_marker(block, _blocks(size))
        except OSError:
            self._try(_write_at, self.dat, head, block * _BLOCK)
            raise
        self.index.remove(_hash(key), slot & _SLOT_MASK)
        self._count(_blocks(size), -1)
        if _slot_exp(slot):
            self._unexpire(_slot_exp(slot), slot & _SLOT_MASK)
        self.free.add(block, _blocks(size))

    def _supersede(self, key: bytes, old: int) -> None:
        """Invalidate key's previous copy, after its new one is written. The
        new copy has committed, so a failure here is not the caller's: the
        old copy waits on a list that the next write empties first."""
        try:
            self._invalidate((key, old))
        except OSError:
            self.stale.append((key, old))

    def _invalidate(self, copy: tuple[bytes, int]) -> None:
        """Write a free marker over a superseded copy of a key and free it.
        If that copy was durable, the key's new copy is fsynced first."""
        block, blocks = _slot_block(copy[1]), _blocks(_slot_size(copy[1]))
        if _HEAD.unpack(_read_at(self.dat, _HEAD.size, block * _BLOCK))[4] < self.durable_seq:
            self._sync()
        self._write_marker(block, blocks)
        self.free.add(block, blocks)

    def _next_seq(self) -> int:
        if self.seq >= self.lease:
            self.lease = self.seq + _LEASE
            self._write_header(_OPEN)
        self.seq += 1
        return self.seq - 1

    def _write_marker(self, block: int, length: int) -> None:
        _write_at(self.dat, _free_marker(length), block * _BLOCK)
        self.dat_size = max(self.dat_size, block * _BLOCK + _HEAD.size)

    def _write_header(self, state: int) -> None:
        # Within one disk sector, at offset 0: written whole or not at all.
        data = _pack_header(state, self.seq if state == _CLOSED else self.lease,
                            self.stamp if state == _CLOSED else 0)
        _write_at(self.dat, data, 0)
        self.dat_size = max(self.dat_size, len(data))
        self._sync()

    def _sync(self) -> None:
        try:
            _fsync(self.dat)
        except OSError as exc:
            self.failed = exc
            raise
        self.durable_seq = self.seq

    @_unit
    def sync(self) -> None:
        self._check_writable()
        self._sync()

    # --- Upkeep: bounded work after each write ---

    def _tidy(self, now: float) -> None:
        """Reclaim a few expired keys and give back a free tail. Runs after a
        call's commit point: a failure is left for later."""
        if self.failed is not None:
            return  # no more writes until reopened
        try:
            self._reclaim(now, _RECLAIM_BATCH)
            self._trim()
        except CorruptStoreError:  # a damaged bucket of .idx, found after the commit
            if not self.index.damaged:
                raise
        except OSError as exc:
            _log.debug("datastore %s: upkeep failed, will retry: %s", self.dat_path, exc)

    def _reclaim(self, now: float, limit: int) -> None:
        """Free up to `limit` expired keys' records, earliest first."""
        if not self.expiries.count:
            return
        now_bits = _float_bits(now)
        for place in self.expiries.due(now_bits, limit):
            head = _read_at(self.dat, _HEAD.size + _MAX_KEY_BYTES, (place >> 16) * _BLOCK)
            magic, kind, key_len, _, _, exp, _, _ = _HEAD.unpack_from(head.ljust(_HEAD.size))
            if magic != _MAGIC or kind != _VALUE or not 0 < exp <= now_bits:
                self.index.damaged = True  # (a snapshot that lies: read .dat again)
                raise CorruptStoreError(f"{self.idx_path} lists an expiry that "
                                        f"{self.dat_path} does not hold", path=self.idx_path)
            self._drop(head[_HEAD.size:_HEAD.size + key_len], place | exp << _EXP_SHIFT)

    def _unexpire(self, exp: int, place: int) -> None:
        """Take a record's expiry out of the order (after its record went)."""
        try:
            self.expiries.remove(exp, place)
        except KeyError:  # the snapshot did not list it: it lied; read .dat again
            self.index.damaged = True

    def _trim(self) -> None:
        """Give a free extent at the end of .dat back to the file system."""
        start = self.free.start_before(_blocks(self.dat_size))
        if start is not None:
            self._changing()
            os.ftruncate(self.dat, start * _BLOCK)
            self.free.remove(start)
            self.dat_size = start * _BLOCK

    def _move(self, limit: int) -> int:
        """Move up to `limit` records from the end of .dat into free extents
        nearer the start (see compaction); returns how many moved."""
        return _move_down(self, limit)

    def _copy(self, key: bytes, record: bytes, target: int, block: int) -> int:
        """Write a copy of key's record (now at `block`), with a new sequence
        number, at block `target`, and point the index at it. Returns the
        original's slot: the caller must invalidate it, once the copy is
        durable if it was."""
        self._write_record(target, _blocks(len(record)), _with_seq(record, self._next_seq()))
        exp = int(_HEAD.unpack_from(record)[5])
        old, new = _slot(len(record), block), _slot(len(record), target)
        self.index.replace(_hash(key), old, new)
        if exp:
            self._unexpire(exp, old)
            self.expiries.add(exp, new)
        self.moves += 1
        return old | exp << _EXP_SHIFT

    @_unit
    def compact(self, now: float) -> None:
        """All the upkeep at once: reclaim every expired key and move records
        down until little space is left free (see compaction)."""
        self._check_writable()
        self._reclaim(now, self.index.count)
        self.credit = 0  # (its copies go to the end of .dat: see compaction)
        _compact(self)

    # --- Closing ---

    def close(self, now: float) -> None:
        """Write the snapshot, mark the header closed, and close the files;
        they are closed even if it raises. After a failed fsync, or a write
        cut short, it writes nothing: the next open scans .dat."""
        try:
            if self.failed is None and not self.busy and not self.closing and self.dat >= 0:
                self.closing = True  # once: a close() cut short does not write again
                self._check_writable()
                if self.changed:
                    self._trim()
                    if self.used() <= self.max_bytes:
                        _write_snapshot(self)
                    else:  # no room for the free map (see recovery._check_room)
                        self._sync()  # the next open reads .dat, as after a crash
                else:  # .idx as the last close left it, trusted at open
                    self._write_header(_CLOSED)
        finally:
            self.close_files()

    def close_files(self) -> None:
        """Unmap .idx and close it and .dat (which drops its lock); again
        does nothing. They are forgotten before they are closed, so that a
        close cut short by an interrupt is never repeated on a number the
        system reused."""
        files, self.files, self.dat, self.index.fd = self.files, [], -1, -1
        self.index.close()
        for file in files:
            file.close()

    def _changing(self) -> None:
        """Before the first write since open: the snapshot in .idx's tail
        no longer matches the files once this writes, so it goes, and takes
        no room in max_bytes; close() writes another (`changed`, set first,
        in case the cut is cut short: unchanged, close() reuses it)."""
        if not self.changed:
            self.changed = True
            self.index.drop_tail()

    def _try(self, action: Any, *args: Any) -> None:
        """Best effort, on a path that is already failing."""
        with suppress(OSError):
            action(*args)


# --- store.py ----------------------------------------------------------------
# The store as users see it: ``DataStore``, and the same calls on a default store.
#
# ``DataStore`` knows users: it checks arguments (``codec``), holds the locks
# (``locks``) and a mutex for threads, reads the clock and applies the ttl
# rules, and says what went wrong in words a user can act on. The engine
# below it knows only bytes, records and files.

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


# --- cli.py ------------------------------------------------------------------
# The command line: ``datastore [--path PATH] [--timeout SECONDS] COMMAND ...``.
#
# ``export`` and ``import`` move a store's content in and out as JSON Lines,
# one key a line: ``{"key": ..., "value": {...}, "expires_at": ...}``, where
# ``expires_at`` is the Unix time (``time.time()``) the key expires at, or
# null. An absolute time, not a ttl, so that a file read days later restores
# the keys that are still live, with the expiries they had.

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


if __name__ == "__main__":
    sys.exit(main())
