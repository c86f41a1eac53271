"""White-box tests of datastore.legacy, the conversion of stores written by
version 1.0 at their first open. What a user sees of it (the content kept,
kill -9 during it, the cap) is in test_datastore.py."""

import os
import shutil
from pathlib import Path

from datastore import DataStore
from datastore import format as fmt
from tests.support import ROOT


def test_each_copy_is_durable_before_its_1_0_original_is_invalidated(tmp_path, monkeypatch):
    path = tmp_path / "store"
    for suffix in (".dat", ".dir"):
        shutil.copy(ROOT / "fixtures" / f"store-1.0-closed{suffix}", f"{path}{suffix}")
    old = Path(f"{path}.dat").read_bytes()
    originals = {at for at in range(512, len(old), 512) if old.startswith(b"DSr1", at)}
    real_pwrite, real_fsync, unsynced, checked = os.pwrite, os.fsync, [], []

    def pwrite(fd, data, pos):
        if data[:4] == fmt._MAGIC and data[4] == fmt._VALUE:
            unsynced.append(pos)  # a version 2 copy, not yet durable
        elif data[:4] == fmt._MAGIC and data[4] == fmt._FREE and pos in originals:
            checked.append(pos)
            assert not unsynced, "a 1.0 record freed before the copies were fsynced"
        return real_pwrite(fd, data, pos)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fsync", lambda fd: unsynced.clear() or real_fsync(fd))
    with DataStore(path) as s:
        monkeypatch.undo()
        assert len(s) == 12
    assert len(checked) >= 12  # every original was freed, each after its copy
