"""The storage engine: records and free space in .dat, the index in .idx.

The index (see index) maps a hash of each key to the place of its record;
the key itself is checked against the record. The store keeps in memory the
free extents (by start, by end and by size, merged with free neighbours),
the records that have a ttl in order of expiry, and the sizes of the files.
It changes them only after the bytes are written. The index file is not
kept in step on disk while the store is open: after a crash it is rebuilt
from .dat (see recovery).

* ``create`` takes the best-fitting free extent, or appends to ``.dat``. If
  it splits an extent, it first writes a free marker for the remainder. The
  write of the record is the *commit point*: from then on the key exists.
  It leaves room in ``max_bytes`` for a copy of the largest record, which a
  ``set`` replacing a record with one no larger may use, and for 64 spilled
  index entries (see index): so at the cap a delete makes room for a create
  of its size (while no more are spilled).
* ``set`` of a live key writes the new record the same way (its commit
  point), then a free marker over the old one. If the old record was
  durable (see below), the new one is fsynced first.
* ``delete`` writes a free marker over the record's head: that write is the
  commit point. The blocks join the free extents. (If the write fails part
  way, the head is written back, so a failed delete leaves the value.)
* An expired key costs nothing when it expires. Each write then reclaims a
  few expired keys, earliest first, by writing a free marker over each (so a
  reclaimed key can never come back, even if the clock is set back).
* Free space at the end of ``.dat`` is given back by truncating the file.
  Free space lower down waits for the creates that fit in it: a delete
  moves no records (that cost a delete more than twice its own work, for a
  file that the next creates fill again). A create that finds no room in the cap
  moves up to 64 records from the end of ``.dat`` into free extents nearer
  the start: it writes the copies (with new sequence numbers), then
  truncates the originals away. ``compact()`` moves all it can, at once.

Any work after a commit point (freeing, moving, truncating) that fails is
left for a later call: the call itself has succeeded.
"""

from __future__ import annotations

import io
import os
import zlib
from contextlib import suppress
from typing import Any, Callable, Iterator, Optional

from .compaction import _compact, _move_down
from .errors import CorruptStoreError, _log, _StoreFull, _unit
from .format import (
    _BLOCK, _CLOSED, _EXP_SHIFT, _FIELDS, _HEAD, _LATEST_EXPIRY_BITS, _LEASE, _MAGIC,
    _MAX_BLOCKS, _MAX_KEY_BYTES, _MAX_SEQ, _OPEN, _SLOT_MASK, _VALUE, _blocks, _bits_float,
    _float_bits, _free_marker, _fsync, _pack_header, _pack_value, _read_at,
    _slot, _slot_block, _slot_exp, _slot_size, _value_body, _with_seq, _write_at,
)
from .index import _SPILL_ROOM, _hash, _Index
from .opening import _open
from .recovery import _indexed_heads
from .snapshot import _PER_EXPIRY, _snapshot_room, _write_snapshot
from .space import _Expiries, _FreeSpace

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


