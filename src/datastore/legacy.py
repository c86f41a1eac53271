"""Stores written by versions 1.0 to 3, converted in place at their first open.

Versions 2 and 3 wrote this version's records (see format) at 512-byte
boundaries, under the magic "DSr2", and 2.0 also its index as a record of
kind 3 (base64 text) at each close. Their heads are given this version's
magic in place (``_upgrade``), and then the store is read as after a crash.

A 1.0 ``.dat`` starts with a header (``_V1_HEADER``: magic "DataStr1",
state, sequence number, and two CRC-checked fields) and holds records at
512-byte boundaries, each with a head (``_V1_HEAD``): magic "DSr1", kind (1
a value, 2 a tombstone), key length, (unused), expires_at as a float64, body
length, CRC-32 of the head before it, the key and the body. The newest
record of a key, the one at the highest offset, is the key's state. Each
value is copied as a record of this version (``_convert_v1``).
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import TYPE_CHECKING, Optional

from .codec import _LATEST_EXPIRY, MAX_VALUE_BYTES
from .errors import _damaged, _StoreFull
from .format import (
    _BLOCK, _FIELDS, _HEAD, _MAGIC, _MAX_SEQ, _VALUE, _blocks, _free_marker, _fsync,
    _parse_item, _remove, _slot, _valid_key, _write_at,
)
from .index import _hash
from .recovery import _chunks, _index_found, _items_at, _scan

if TYPE_CHECKING:
    from .engine import _Engine

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
