"""The snapshot: the index as a clean close leaves it, for a fast next open.

A clean ``close()`` writes the index table into ``.dat`` and the ``.dir``
lines (both described in ``format``), fsyncs them and the records they point
at, and only then marks the header *closed* with the size and CRC-32 of
``.dir`` and where the table is. The next open trusts the snapshot only if
the header says closed and ``.dir`` and the table match it; otherwise it
scans ``.dat`` (see ``recovery``). What matches but makes no sense (keys
twice, records out of bounds) is damage, not a crash, and is refused.
"""

from __future__ import annotations

import os
import zlib
from collections import deque
from itertools import repeat
from operator import lshift, or_
from typing import TYPE_CHECKING, Optional, Sequence

from .errors import CorruptStoreError, _damaged
from .format import (
    _BLOCK, _BLOCK_SHIFT, _CLOSED, _EXP_SHIFT, _HEAD, _LATEST_EXPIRY_BITS, _MAX_RECORD,
    _TABLE, _Header, _blocks, _fsync, _pack_dir, _pack_marker, _pack_table, _parse_item,
    _read_at, _unpack_dir_keys, _unpack_table, _valid_keys, _write_at,
)
from .recovery import _check_room, _derive_free

if TYPE_CHECKING:
    from .engine import _Engine


def _write_snapshot(engine: _Engine) -> None:
    """Write the index table and .dir, fsync, then mark the header closed."""
    table = (0, 0)
    if engine.index:
        body = _pack_table(list(engine.index), list(engine.index.values()))
        record = _pack_marker(_TABLE, len(body), body, engine.seq)
        block, _ = engine._place(len(record))  # used() has counted its room all along
        engine._write_record(block, _blocks(len(record)), record)
        table = (block * _BLOCK, len(record))
    lines = _pack_dir(engine.index.items())
    _write_at(engine.dir, lines, 0)
    os.ftruncate(engine.dir, len(lines))
    _fsync(engine.dir)
    engine._sync()  # the records .dir points at, before the header trusts it
    engine._write_header(_CLOSED, len(lines), zlib.crc32(lines), table)


def _load_snapshot(engine: _Engine, header: _Header) -> bool:
    """Load the index from the .dir and index table a clean close wrote.

    The keys come from .dir, in its order; their blocks, sizes and
    expiries from the table, as binary, which is faster than parsing the
    same numbers out of .dir's text. Returns False if either does not
    match the header (then scan .dat). What matches but does not make
    sense raises CorruptStoreError.
    """
    engine.dat_size = os.fstat(engine.dat).st_size
    if (os.fstat(engine.dir).st_size != header.dir_size
            or header.dir_size > engine.max_bytes):
        return False
    text = _read_at(engine.dir, header.dir_size, 0)
    table = _read_table(engine, header.table_pos, header.table_size)
    if zlib.crc32(text) != header.dir_crc or table is None:
        return False
    keys = _unpack_dir_keys(text, engine.dir_path)
    blocks, sizes, lines, exps = table
    if len(blocks) != len(keys):
        raise _damaged(engine.dat_path, "the index table does not match .dir")
    # Records do not overlap (_derive_free checks, below), so the one
    # that starts last ends last: where it ends is all .dat they need.
    last = blocks.index(max(blocks)) if keys else None
    end = 0 if last is None else blocks[last] * _BLOCK + sizes[last]
    if keys and (min(blocks) < 1 or min(sizes) <= _HEAD.size or max(sizes) > _MAX_RECORD
                 or end > engine.dat_size):
        raise _damaged(engine.dat_path, "a record in the index table is out of bounds")
    if not _valid_keys(keys):
        raise _damaged(engine.dir_path, "a key is not 1 to 32 characters of UTF-8")
    if lines and (max(lines) >= len(keys) or len(frozenset(lines)) != len(lines)
                  or min(exps) <= 0 or max(exps) > _LATEST_EXPIRY_BITS):
        raise _damaged(engine.dat_path, "bad expiry in the index table")
    slots = list(map(or_, sizes, map(lshift, blocks, repeat(_BLOCK_SHIFT))))
    deque(map(slots.__setitem__, lines, map(or_, map(slots.__getitem__, lines),  # in C:
                                             map(lshift, exps, repeat(_EXP_SHIFT)))), maxlen=0)
    engine.index.update(zip(keys, slots))
    if len(engine.index) != len(keys):
        raise _damaged(engine.dir_path, "a key is listed twice")
    engine.expiries.load(exps, list(map(keys.__getitem__, lines)))
    engine.dir_bytes = len(text)
    engine.seq = header.seq
    _derive_free(engine, None)  # writes nothing
    _check_room(engine, end)
    return True


def _read_table(engine: _Engine, pos: int, size: int) -> Optional[tuple[Sequence[int], ...]]:
    """The index table's blocks, sizes, ttl lines and expiries (float
    bits), or None if it is damaged. An empty store has no table."""
    if not size:
        return ((), (), (), ()) if not pos else None
    if (pos % _BLOCK or pos < _BLOCK or pos + size > engine.dat_size
            or size > engine.max_bytes // 16):  # 6 to 18 bytes a key, 512 or more a key
        return None
    item = _parse_item(_read_at(engine.dat, size, pos), 0)
    if item is None or item[0] != _TABLE or item[5] != size:
        return None
    return _unpack_table(_read_at(engine.dat, item[4], pos + _HEAD.size))


def _listed_keys(engine: _Engine, header: _Header) -> Optional[list[bytes]]:
    """The keys .dir lists, if it is the one the header says close wrote (it
    is the index table or .dat that does not match): for recovery to tell
    which keys the scan lost. None if .dir is damaged too."""
    if os.fstat(engine.dir).st_size != header.dir_size or header.dir_size > engine.max_bytes:
        return None
    text = _read_at(engine.dir, header.dir_size, 0)
    if zlib.crc32(text) != header.dir_crc:
        return None
    try:
        return _unpack_dir_keys(text, engine.dir_path)
    except CorruptStoreError:
        return None
