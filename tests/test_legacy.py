"""White-box tests of datastore.legacy, the conversion of stores written by
versions 1.0 to 3 at their first open. What a user sees of it (the content kept,
kill -9 during it, the cap) is in test_datastore.py."""

import errno
import os
import shutil
import zlib
from pathlib import Path

import pytest

from datastore import MIN_STORE_BYTES, DataStore
from datastore import format as fmt
from datastore import recovery
from tests.support import ROOT, counted_size, files_size


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


def test_a_converted_store_keeps_no_head_a_version_3_would_read(tmp_path):
    # Version 3 refuses a file with no header or record of its own; a marker
    # of its left in the free space would make it "recover" the store empty.
    for fixture, suffixes in (("2.0-closed", (".dat", ".dir")), ("3.0-closed", (".dat", ".idx")),
                              ("3.1-closed", (".dat", ".idx")), ("3.1-crashed", (".dat", ".idx"))):
        path = tmp_path / fixture / "store"
        path.parent.mkdir()
        for suffix in suffixes:
            shutil.copy(ROOT / "fixtures" / f"store-{fixture}{suffix}", f"{path}{suffix}")
        old = Path(f"{path}.dat").read_bytes()
        assert [at for at in range(512, len(old), 512) if old.startswith(b"DSr2", at)]
        DataStore(path).close()
        data = Path(f"{path}.dat").read_bytes()
        assert not [at for at in range(512, len(data), 512)
                    if data.startswith(b"DSr2", at) and data[at + 4] < 0x20], fixture


def test_a_conversion_cut_short_in_a_store_whose_header_is_damaged_converts_again(
        tmp_path, monkeypatch):
    path = tmp_path / "store"
    shutil.copy(ROOT / "fixtures" / "store-3.1-closed.dat", f"{path}.dat")
    data = bytearray(Path(f"{path}.dat").read_bytes())
    data[20] ^= 0xFF  # which version wrote it is not known
    Path(f"{path}.dat").write_bytes(bytes(data))
    monkeypatch.setattr(recovery, "_SCAN_CHUNK", 1024)  # a few records a chunk
    real, writes = os.pwrite, []

    def second_write_fails(fd, data, pos):
        writes.append(pos)
        if len(writes) == 2:
            raise OSError(errno.EIO, "injected")
        return real(fd, data, pos)
    monkeypatch.setattr(os, "pwrite", second_write_fails)
    with pytest.raises(OSError, match="injected"):
        DataStore(path)  # after the first chunk's heads, and before the rest
    monkeypatch.setattr(os, "pwrite", real)
    with DataStore(path) as s:
        assert len(s) == 12 and s.read("ключ 🔑") == {"unicode": "é"}


def version_3_store(path, values, max_bytes):
    """A store as version 3 leaves it when killed: its header, then one
    record of each (key, JSON) at a 512-byte boundary, under its magic,
    until the next would take the files past max_bytes. Returns how many."""
    header = fmt._HEADER.pack(b"DataStr3", fmt._OPEN, 1 << 20, 0, 0)[:-4]
    blocks = [header + zlib.crc32(header).to_bytes(4, "little")]
    for seq, (key, body) in enumerate(values, 1):
        fields = fmt._FIELDS.pack(b"DSr2", fmt._VALUE, len(key), 0, seq, 0, len(body))
        crc = zlib.crc32(body, zlib.crc32(key, zlib.crc32(fields)))
        record = fields + crc.to_bytes(4, "little") + key + body
        if 512 * len(blocks) + len(record) > max_bytes:
            break
        blocks.append(record)
    Path(f"{path}.dat").write_bytes(b"".join(block.ljust(512, b"\0") for block in blocks[:-1])
                                    + blocks[-1])
    return len(blocks) - 1


def test_a_version_3_store_filled_to_its_cap_opens_at_it_and_compacts(tmp_path):
    path, cap = tmp_path / "store", MIN_STORE_BYTES
    values = ((b"k%03d" % i, b'{"v":"%s"}' % (b"x" * 100)) for i in range(1000))
    count = version_3_store(path, values, cap - 8192)  # and .idx: two 4 KiB pages
    with DataStore(path, max_bytes=cap) as s:
        assert len(s) == count and files_size(path) <= cap
        assert counted_size(s) > cap  # this version keeps more in reserve
        s.create("new", {})  # records moved down into the old blocks' slack make room
        assert files_size(path) <= counted_size(s) <= cap
        s.compact()  # and all of them, packed into 64-byte blocks
        assert files_size(path) <= counted_size(s) <= cap
        assert os.path.getsize(f"{path}.dat") < 512 * count // 2
    with DataStore(path, max_bytes=cap) as s:
        assert len(s) == count + 1 and s.read("k007") == {"v": "x" * 100}
