"""Free space and expiries: the two orders the engine keeps in memory.

``_FreeSpace`` holds the free extents of ``.dat`` (runs of blocks no record
holds), merged with their free neighbours, findable by start, by end and by
length. ``_Expiries`` holds the records that have a ttl (by their place, see
format), in order of expiry.
Neither does I/O: the engine writes the free markers and records first, then
tells these.
"""

from __future__ import annotations

import builtins
from array import array
from bisect import bisect_left, bisect_right
from itertools import islice
from operator import gt
from typing import Optional, Sequence

from .format import _MAX_BLOCKS

# Free extents are binned by length: 1 to _MAX_BLOCKS blocks, then longer.
_LONG = _MAX_BLOCKS + 1


class _FreeSpace:
    """The free extents of .dat, as (start block, length in blocks)."""

    def __init__(self) -> None:
        self.at: dict[int, int] = {}   # start -> length
        self.to: dict[int, int] = {}   # end -> start
        # Starts by length (builtins.set: the copy-in file's set() stores a value)
        self.bins: list[builtins.set[int]] = [builtins.set() for _ in range(_LONG + 1)]
        self.blocks = 0                # free blocks in all

    def add(self, start: int, length: int) -> None:
        """Count blocks [start, start + length) free, merged with free neighbours."""
        before = self.to.get(start)
        if before is not None:
            length += self.remove(before)
            start = before
        if start + length in self.at:
            length += self.remove(start + length)
        self.at[start] = length
        self.to[start + length] = start
        self.bins[min(length, _LONG)].add(start)
        self.blocks += length

    def remove(self, start: int) -> int:
        """Take the extent that starts at `start` out; return its length."""
        length = self.at.pop(start)  # may raise KeyError: a bug
        del self.to[start + length]
        self.bins[min(length, _LONG)].discard(start)
        self.blocks -= length
        return length

    def fitting(self, blocks: int) -> Optional[int]:
        """The start of a smallest extent of at least `blocks` blocks, or None."""
        if self.blocks >= blocks:
            for length in range(blocks, _LONG + 1):
                if self.bins[length]:
                    start = self.bins[length].pop()
                    self.bins[length].add(start)  # pop() then add(): a cheap peek
                    return start
        return None


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
        if not ordered and any(map(gt, zip(exps, keys), islice(zip(exps, keys), 1, None))):
            pairs = sorted(zip(exps, keys))
            exps, keys = [exp for exp, _ in pairs], [key for _, key in pairs]
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


