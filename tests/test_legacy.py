"""White-box tests of datastore.legacy, the conversion of stores written by
versions 1.0 to 3 at their first open. What a user sees of it (the content kept,
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
    originals = {at for at in range(512, len(old), 512) if old.startswith(b"DSr1", at)}  # (1.0)
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


def test_each_head_a_3_x_store_gets_is_durable_before_the_new_header(tmp_path, monkeypatch):
    """A power cut keeps what was fsynced: what .dat held at the last fsync
    before the header says version 4 must have every record's new head."""
    path = tmp_path / "store"
    for suffix in (".dat", ".idx"):
        shutil.copy(ROOT / "fixtures" / f"store-3.1-closed{suffix}", f"{path}{suffix}")
    real_pwrite, real_fsync, durable, at_header = os.pwrite, os.fsync, [b""], []

    def fsync(fd):
        real_fsync(fd)
        if os.path.samestat(os.fstat(fd), os.stat(f"{path}.dat")):
            durable.append(Path(f"{path}.dat").read_bytes())

    def pwrite(fd, data, pos):
        if pos == 0 and bytes(data[:8]) == b"DataStr4":
            at_header.append(durable[-1])
        return real_pwrite(fd, data, pos)
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fsync", fsync)
    with DataStore(path) as s:
        monkeypatch.undo()
        assert len(s) == 12
    before = at_header[0]
    heads = [at for at in range(512, len(before), 512)
             if fmt._parse_item(before, at) is not None and before[at + 4] == fmt._VALUE]
    assert len(heads) == 13  # the 12 keys, and "expired", still on disk


def test_a_3_x_store_whose_header_is_damaged_is_converted_too(tmp_path):
    path = tmp_path / "store"
    shutil.copy(ROOT / "fixtures" / "store-3.1-closed.dat", f"{path}.dat")
    data = bytearray(Path(f"{path}.dat").read_bytes())
    data[20] ^= 0xFF  # its CRC no longer matches: which version wrote it is not known
    Path(f"{path}.dat").write_bytes(bytes(data))
    with DataStore(path) as s:
        assert len(s) == 12 and s.read("ключ 🔑") == {"unicode": "é"}
    assert Path(f"{path}.dat").read_bytes()[:8] == b"DataStr4"
