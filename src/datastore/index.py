"""The index: where each key's record is, in ``path.idx``, mapped into memory.

The process keeps almost nothing per key: the index lives in a file that is
mapped into memory (its pages are the kernel's page cache, not the
process's own memory), and a clean open reads only its header and
directory, whatever the number of keys. It holds no keys either: each entry
is a 32-bit hash of the key and the place of its record in ``.dat``, and the
engine checks the key against the record it reads (see engine).

It is an extendible hash table (Fagin et al., 1979). The *directory*, kept
in memory, has ``2 ** depth`` entries; the entry for a hash is its top
``depth`` bits, and names the page that holds every hash that starts so.
A page holds the hashes of one prefix of ``d <= depth`` bits (its *local
depth*), in ascending order. A full page splits in two by the hash's next
bit: one new page, half the entries moved, and the directory doubled if
``d`` was ``depth``. So an insert costs at most one page's work, never the
whole table's, and the file grows a page at a time. When ``max_bytes`` has
no room for that page, the entry is *spilled* instead: kept beside the
buckets, in memory and in the snapshot a clean close writes (12 bytes,
which the engine keeps room for), until a removal makes room in its bucket
or the next rebuild takes it in.

``path.idx`` is a sequence of 4096-byte pages. Page 0 is the header
(``_IDX_HEADER``, little-endian)::

    magic "DSidx4\\0\\0"  8 bytes
    state                1 byte: 0 closed cleanly, 1 open (or killed while open)
    depth                1 byte: the directory's depth
    (zero)               2 bytes
    pages                4 bytes: pages in the file, this one included
    keys                 8 bytes: entries in all pages
    stamp                8 bytes: the .dat header's sequence number when a
                         clean close wrote this (see opening)
    tail size, CRC-32    4 + 4 bytes: of what follows the last page
    CRC-32               4 bytes, of the fields before it

Every other page is a *bucket*::

    prefix               4 bytes: the top d bits its hashes share, then zeros
    local depth d        1 byte
    (zero)               1 byte
    count                2 bytes: entries, at most _ENTRIES (340)
    CRC-32               4 bytes, of the page with this field zero, written at
                         a clean close (it is stale while the store is open)
    (zero)               4 bytes
    hashes               340 x 4 bytes: the entries' hashes, ascending
    places               340 x 8 bytes: each entry's record in .dat, as
                         format's slot without the expiry: size | block << 16

After the last page, a clean close writes the *tail*: the directory
(``2 ** depth`` page numbers of 4 bytes), then what the engine keeps besides
(see snapshot). The file is trusted only after a clean close that
the .dat header confirms (see opening); otherwise it is rebuilt from a scan
of ``.dat``, which is the truth. A bucket's CRC is checked the first time it
is used after an open.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections import deque
from contextlib import suppress
from itertools import repeat
from operator import and_, lshift, or_, rshift
from typing import Any, Iterable, Optional

from .errors import _damaged, _StoreFull
from .format import _CLOSED, _OPEN, _fsync, _read_at, _write_at

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
