"""Recovery: rebuilding the index by scanning .dat, after a crash.

``.dat`` is the truth; ``.idx`` is trusted only after a clean close (see
``snapshot``), and is rebuilt from the scan otherwise. Opening a store marks its header
*open* (fsynced) before anything else is written, so a store that was not
closed cleanly is always scanned:

* A record counts only if its CRC-32 matches, so a torn write is never taken
  for data. Free markers are recognised too, so the scan
  can tell free space from damage; damage beyond the one record a crash can
  tear is logged on the ``datastore`` logger.
* Each key has at most one valid record at rest. While a record is being
  moved or replaced there are two, and the higher sequence number wins; the
  scan then invalidates the other before the store is used. Sequence
  numbers never go back: the header holds a bound that every number issued
  while open stays below, and the scan starts above both that bound and
  every record it saw.
* A record that an earlier ``sync()`` (or open) made durable is never
  invalidated or truncated away before its copy is fsynced, so a power cut
  cannot lose both. A failed fsync refuses further writes until reopened,
  because the kernel may have dropped the pages it could not write.

The scan reads ``.dat`` in chunks and checks the value records of a chunk
in bulk (``_values``), several times faster than one by one; free markers,
which are fewer, go through ``_parse_item``.
"""

from __future__ import annotations

import gc
import logging
import os
import struct
import sys
import zlib
from array import array
from collections import Counter
from itertools import compress, repeat
from operator import add, and_, lt, rshift
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence

from .codec import MAX_VALUE_BYTES
from .errors import CorruptStoreError, _damaged, _log, _StoreFull
from .format import (
    _BLOCK, _BLOCK_BITS, _BLOCK_SHIFT, _CLOSED, _EXP_SHIFT, _FIELDS, _FREE, _HEAD,
    _LATEST_EXPIRY_BITS, _MAGIC, _MAX_BLOCKS, _MAX_KEY_BYTES, _MAX_RECORD, _MAX_SEQ, _SIZE_MASK,
    _SLOT_MASK, _VALUE, _Header, _Item, _blocks, _fsync, _parse_item, _read_at,
    _slot_block, _slot_size, _valid_key, _valid_keys,
)
from .index import _SPILL_ROOM, _hash

if TYPE_CHECKING:
    from .engine import _Engine

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
