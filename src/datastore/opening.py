"""Opening a store: from the files on disk to an engine ready for calls.

A new store's .dat is made whole first (see format's _create_data_file);
then .dat is opened and locked (locks), a creator's leftover temporary file
removed, and the index loaded: from .idx after a clean close (snapshot), by
a scan after a crash (recovery), or by converting a store written by
version 1.0, 2 or 3 (legacy). Only then is the header marked open, before
anything else is written.
"""

from __future__ import annotations

import gc
import glob
import os
import re
from typing import TYPE_CHECKING, Optional

from .errors import CorruptStoreError
from .format import (
    _BLOCK, _HEADER, _LEASE, _OPEN, _Header, _create_data_file, _fsync_folder,
    _open_regular, _read_at, _remove,
)
from .index import _keys_saved
from .legacy import (
    _OLD_BLOCK, _OLD_MAGIC, _convert_v1, _is_v1_header, _upgrade, _written_by_2_or_3,
)
from .locks import _engines, _lock_data_file
from .recovery import _holds_records, _recover
from .snapshot import _load_snapshot

if TYPE_CHECKING:
    from .engine import _Engine


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
