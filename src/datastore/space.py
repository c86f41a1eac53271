"""Free space and expiries: the two orders the engine keeps in memory.

``_FreeSpace`` holds the free extents of ``.dat`` (runs of blocks no record
holds), merged with their free neighbours, findable by start, by end and by
length, in about a byte a block of ``.dat`` and 8 bytes an extent.
``_Expiries`` holds the records that have a ttl (by their place, see
format), in order of expiry.
Neither does I/O: the engine writes the free markers and records first, then
tells these.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from itertools import chain, repeat
from operator import and_, lshift, or_, rshift
from typing import Iterator, Optional, Sequence

from .format import _EXP_SHIFT, _MAX_BLOCKS, _SLOT_MASK

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


