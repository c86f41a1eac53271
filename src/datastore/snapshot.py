"""The snapshot: what a clean close leaves in ``.idx`` for a fast next open.

A clean ``close()`` fsyncs ``.dat``, then saves the index (see index) with,
in its tail after the directory, what the engine keeps in memory besides
(``_SNAPSHOT``, little-endian)::

    .dat size          8 bytes: where .dat ended at the close
    free extents       4 bytes: how many, n
    expiring records   4 bytes: how many, m
    spilled entries    4 bytes: how many, s (index entries no bucket took)
    free map           4 bytes: its length, b (at most .dat's blocks)
    records by blocks  (_MAX_BLOCKS + 1) x 4 bytes: indexed records taking
                       0, 1, 2, ... blocks
    free map           b bytes: 1 for each free block of .dat, else 0
    free extents       n x 8 bytes: each one's length (up to _MAX_BLOCKS,
                       or _LONG for longer) << 32 | its start block,
                       ascending (see space); or none (n = 0) if they do
                       not fit in max_bytes: the open then finds them in
                       the map
    expiries           m x 8 bytes: expires_at bits, ascending, then
                       m x 8 bytes: each one's place (see format)
    spilled entries    s x 4 bytes: hashes, then s x 8 bytes: places

and only then marks the header of ``.dat`` *closed*. The next open trusts
``.idx`` only if the header says closed and ``.idx`` says it was saved at
that very close (see index), and ``.dat`` is the size it was: then it reads
the header and the tail, and nothing per key but the expiries; the free
space is loaded whole, however many extents (see space). Otherwise
it scans ``.dat`` (see recovery). What matches but makes no sense is
damage, and is refused.
"""

from __future__ import annotations

import os
import struct
from array import array
from typing import TYPE_CHECKING

from .errors import _damaged, _StoreFull
from .format import _CLOSED, _LATEST_EXPIRY_BITS, _MAX_BLOCKS, _Header, _blocks

if TYPE_CHECKING:
    from .engine import _Engine

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
