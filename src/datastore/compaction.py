"""Moving records down, and compact(): the smallest layout the records allow.

A create that finds no room in the cap moves a few records from the end of
``.dat`` into free extents lower down (``_move_down``), which is all it
takes while the free extents are no smaller than the records at the end.
When a record at the end fits no free extent (say one 16 KiB value, with
free extents of a block or two between small records), moving stops,
however much is free.

So after moving what it can that way, ``compact()`` sweeps the records
above the lowest free extent, in order of their blocks: a batch at a time,
it appends copies of them to the end of ``.dat`` (within ``max_bytes``),
fsyncs once, and only then marks the originals free, where they join the
free extents around them into one; the moves from the end then bring the
copies back down into that space. It stops once fewer blocks are free than
a sixteenth of .dat's plus one largest record, so a store with little to
gain costs one pass over the index, and a record is copied at most twice.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Optional

from .format import (
    _BLOCK, _VALUE, _blocks, _item_before, _parse_item, _read_at, _slot, _slot_block, _slot_size,
)
from .errors import _StoreFull
from .index import _hash

if TYPE_CHECKING:
    from .engine import _Engine

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
