"""White-box tests of datastore.format: records as the format describes them
(and as tests/support.py reads them for the user-level tests), the numbers
and the limit on expiries. The snapshot's checks are in
test_snapshot.py; the scan that reads records in bulk is in test_recovery.py.
"""

import errno
import os
import random
import stat
from datetime import datetime, timezone
from pathlib import Path

import pytest

from datastore import DataStore, codec
from datastore import format as fmt
from tests.support import abandon, value_record


def test_the_latest_expiry_is_the_last_second_of_the_year_9999():
    """The limit test_datastore.py's largest ttl is computed from."""
    last = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp())
    assert codec._LATEST_EXPIRY == last
    assert fmt._LATEST_EXPIRY_BITS == fmt._float_bits(float(last))


def test_records_read_by_the_documented_format_are_the_ones_parse_item_accepts(path):
    """tests/support.py reads value records from the format's description
    alone, for the user-level tests; it must agree with _parse_item, whatever
    bits are damaged."""
    rng = random.Random(4)
    s = DataStore(path)
    for i in range(200):
        s.create(f"k{i}", {"pad": "x" * rng.randrange(0, 1500)}, ttl=3600 if i % 3 else None)
    for i in range(0, 200, 7):
        s.delete(f"k{i}")  # free markers among the records
    abandon(s)
    pristine = Path(f"{path}.dat").read_bytes()
    heads = [block * fmt._BLOCK for block in range(1, fmt._blocks(len(pristine)))
             if pristine.startswith(fmt._MAGIC, block * fmt._BLOCK)]
    accepted = rejected = 0
    for _ in range(20):
        data = bytearray(pristine)
        for _ in range(rng.randrange(0, 8)):  # bits of heads, and anywhere
            at = rng.choice(heads) + rng.randrange(32) if rng.random() < 0.6 else rng.randrange(
                fmt._BLOCK, len(data))
            data[at] ^= 1 << rng.randrange(8)
        data = bytes(data)
        for off in range(fmt._BLOCK, len(data), fmt._BLOCK):
            item = fmt._parse_item(data, off)
            if item is not None and item[0] == fmt._VALUE:
                kind, seq, key, exp, length, total = item
                body = data[off + total - length:off + total]
                assert value_record(data, off) == (seq, key, exp, body)
                accepted += 1
            else:
                assert value_record(data, off) is None
                rejected += 1
    assert accepted > 1000 and rejected > 100


def test_no_byte_a_user_stores_can_look_like_a_head(path):
    """A head's magic starts with 0xFF, which UTF-8 never holds: so however a
    key or a value falls across blocks, every 0xFF in .dat is in a head (its
    magic, or its numbers), and at a block boundary only a head's magic."""
    rng = random.Random(7)
    alphabet = [chr(c) for c in (*range(0, 0x80), 0xFF, 0x7FF, 0xFFFD, 0x1F511, 0x10FFFF)]
    with DataStore(path) as s:
        for i in range(300):
            key = "".join(rng.choice(alphabet) for _ in range(rng.randrange(1, 33)))
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 400)))
            s.set(key, {key: text, "i": i})
        for key in list(s)[::3]:
            s.delete(key)
        data = Path(f"{path}.dat").read_bytes()
    heads = [at for at in range(fmt._BLOCK, len(data), fmt._BLOCK)
             if fmt._parse_item(data, at) is not None]
    at, found = data.find(b"\xff", fmt._BLOCK), []
    while at >= 0:
        found.append(at)
        at = data.find(b"\xff", at + 1)
    assert [at for at in found if at % fmt._BLOCK == 0] == heads and len(heads) >= 300
    assert {at - at % fmt._BLOCK for at in found} == set(heads)
    assert all(at % fmt._BLOCK < fmt._HEAD.size for at in found)


# --- A new store's files: absent, or a valid header ------------------------

def test_a_new_store_gets_its_data_file_whole_and_its_folder_fsynced(tmp_path, monkeypatch):
    path = tmp_path / "store"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(
        (stat.S_ISDIR(os.fstat(fd).st_mode), sorted(p.name for p in tmp_path.iterdir())))
        or real_fsync(fd))
    links = []
    real_link = os.link
    monkeypatch.setattr(os, "link", lambda src, dst: links.append(
        Path(src).read_bytes()) or real_link(src, dst))
    with DataStore(path) as s:
        s.create("k", {})
    assert links and fmt._Header.parse(links[0]) is not None
    folders = [names for is_dir, names in synced if is_dir]
    assert any({"store.dat", "store.idx", "store.lock"} <= set(names) for names in folders)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.dat", "store.idx", "store.lock"]


@pytest.mark.parametrize("failing", ["pwrite", "fsync", "link"])
def test_a_failure_while_making_a_new_store_leaves_none_or_a_valid_one(tmp_path, monkeypatch,
                                                                      failing):
    path = tmp_path / "store"
    real = getattr(os, failing)

    def fail(*args):
        raise OSError(1, "Operation not permitted")
    monkeypatch.setattr(os, failing, fail)
    if failing == "link":  # a file system without hard links: made in place instead
        DataStore(path).close()
    else:
        with pytest.raises(OSError):
            DataStore(path)
    monkeypatch.setattr(os, failing, real)
    dat = Path(f"{path}.dat")
    assert not dat.exists() or fmt._Header.parse(dat.read_bytes()) is not None
    assert not list(tmp_path.glob("store.dat.*"))  # no temporary file left
    with DataStore(path) as s:
        s.create("k", {})


def test_a_new_data_file_is_fsynced_before_it_takes_its_name(tmp_path, monkeypatch):
    log = []
    real_fsync, real_link = os.fsync, os.link
    monkeypatch.setattr(os, "fsync", lambda fd: log.append(
        "fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        or real_fsync(fd))
    monkeypatch.setattr(os, "link", lambda src, dst: log.append("link") or real_link(src, dst))
    DataStore(tmp_path / "store").close()
    assert log.index("fsync file") < log.index("link") < log.index("fsync folder")


def test_only_a_creators_own_leftover_is_removed(tmp_path):
    path = tmp_path / "store"
    mine = Path(f"{path}.dat.2024-backup.new")  # a user's file, by a similar name
    other = Path(f"{path}.dat.other.dat.999.new")
    for keep in (mine, other):
        keep.write_bytes(b"keep me")
    Path(f"{path}.dat.4242.new").write_bytes(b"x" * 512)
    DataStore(path).close()
    assert mine.read_bytes() == other.read_bytes() == b"keep me"
    assert not Path(f"{path}.dat.4242.new").exists()


def test_a_link_that_fails_for_another_reason_than_no_hard_links_is_raised(tmp_path,
                                                                         monkeypatch):
    def broken(src, dst):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "link", broken)
    with pytest.raises(OSError, match="Input/output error"):
        DataStore(tmp_path / "store")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store.lock"]
