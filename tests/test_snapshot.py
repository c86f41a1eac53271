"""White-box tests of datastore.snapshot: what a clean close appends to .idx,
which the next open trusts only if the header of .dat does. A snapshot the
header trusts but that makes no sense (edited, then made to match) is
refused as damage, never loaded; one damaged since (no longer matching) is
left for a scan, as test_datastore.py shows. And a clean open reads the
headers and the snapshot, nothing per key.
"""

import os
import struct
import threading
import zlib
from pathlib import Path

import pytest

from datastore import CorruptStoreError, DataStore
from datastore import format as fmt
from datastore import index as idx
from datastore import snapshot as snap
from datastore import MIN_STORE_BYTES
from tests.support import counted_size, files_size, fill, live_content, make_store


def rewrite_trusted_snapshot(path, edit):
    """Change the snapshot's fields (a list, see snapshot._SNAPSHOT, then the
    free map, the free extents' keys, expiries and places as lists), then
    make .idx's header match. (No spilled entries.)"""
    data = bytearray(Path(f"{path}.idx").read_bytes())
    header = list(idx._IDX_HEADER.unpack_from(data))
    depth, pages = header[2], header[3]
    at = pages * idx._PAGE + (4 << depth)
    fields = list(snap._SNAPSHOT.unpack_from(data, at))
    n, m, spilled, b = fields[1:5]
    assert not spilled
    rest = at + snap._SNAPSHOT.size
    free = list(data[rest:rest + b])
    rest += b
    keys = list(struct.unpack_from(f"<{n}Q", data, rest))
    exps = list(struct.unpack_from(f"<{m}Q", data, rest + 8 * n))
    places = list(struct.unpack_from(f"<{m}Q", data, rest + 8 * n + 8 * m))
    fields, free, keys, exps, places = edit(fields, free, keys, exps, places)
    extra = (snap._SNAPSHOT.pack(*fields) + bytes(free) + struct.pack(f"<{len(keys)}Q", *keys)
             + struct.pack(f"<{len(exps)}Q", *exps) + struct.pack(f"<{len(places)}Q", *places))
    tail = bytes(data[pages * idx._PAGE:at]) + extra
    data[pages * idx._PAGE:] = tail
    header[6:8] = [len(tail), zlib.crc32(tail)]
    packed = idx._IDX_HEADER.pack(*header[:-1], 0)[:-4]
    data[:idx._IDX_HEADER.size] = packed + zlib.crc32(packed).to_bytes(4, "little")
    Path(f"{path}.idx").write_bytes(bytes(data))


def setting(column, at, value):
    def edit(*columns):
        columns = list(columns)
        columns[column][at] = value(columns[column][at])
        return columns
    return edit


def growing(column, more):
    def edit(*columns):
        columns = list(columns)
        columns[column] = columns[column] + more
        if column == 1:  # the free map: its length too
            columns[0][4] += len(more)
        return columns
    return edit


def store_with_a_hole_and_ttls(path):
    with DataStore(path) as s:
        s._engine._move = lambda limit: 0  # keep the hole
        for i in range(6):
            s.create(f"k{i}", {"i": i}, ttl=1000 if i % 2 else None)
        s.delete("k2")


@pytest.mark.parametrize("edit", [
    pytest.param(setting(0, 6, lambda n: n + 1), id="records-by-blocks-too-many"),
    pytest.param(setting(1, 0, lambda byte: 1), id="free-block-over-the-header"),
    pytest.param(setting(1, -1, lambda byte: 2), id="free-map-not-0-or-1"),
    pytest.param(growing(1, [0] * 10 ** 4), id="free-map-past-the-end"),
    pytest.param(growing(1, [0, 1]), id="free-map-with-a-run-no-key-has"),
    pytest.param(setting(3, 0, lambda exp: 2 ** 63), id="expiry-past-9999"),
    pytest.param(lambda f, fr, k, e, pl: (f, fr, k, e, pl[:-1]), id="places-cut-short"),
])
def test_a_trusted_snapshot_that_makes_no_sense_is_corrupt_store_error(path, edit):
    store_with_a_hole_and_ttls(path)
    rewrite_trusted_snapshot(path, edit)
    before = Path(f"{path}.dat").read_bytes()
    with pytest.raises(CorruptStoreError, match="store.idx is damaged"):
        DataStore(path)
    assert Path(f"{path}.dat").read_bytes() == before


def test_an_untouched_snapshot_passes_the_same_checks(path):
    store_with_a_hole_and_ttls(path)
    rewrite_trusted_snapshot(path, lambda *columns: columns)  # (the helper is faithful)
    with DataStore(path) as s:
        assert sorted(s.keys()) == ["k0", "k1", "k3", "k4", "k5"]
        assert s._engine.free.blocks == 1 and s._engine.expiries.count == 3


def test_a_clean_open_reads_the_headers_and_the_snapshot_and_nothing_a_key(path, monkeypatch):
    with DataStore(path) as s:
        for i in range(3000):
            s.create(f"k{i}", {"i": i})
    reads, real_pread = [], os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: reads.append(n) or real_pread(fd, n, at))
    with DataStore(path) as s:
        monkeypatch.undo()
        assert len(s) == 3000 and s.read("k2999") == {"i": 2999}
    assert len(reads) <= 4 and sum(reads) < 2000, reads  # two headers, the tail


def test_the_snapshot_room_counted_is_what_close_appends_but_the_free_extents(path):
    store_with_a_hole_and_ttls(path)
    saved = os.path.getsize(f"{path}.idx")
    with DataStore(path) as s:
        engine = s._engine
        pages, blocks = engine.index.pages, fmt._blocks(engine.dat_size)
        assert engine.used() >= blocks * fmt._BLOCK + saved  # what the last close left
        engine._changing()  # as the first write does: that snapshot goes
        assert os.path.getsize(f"{path}.idx") == pages * idx._PAGE
        room = engine.used() - blocks * fmt._BLOCK
        free_map = engine.free.dump()[0]
    # a byte a block of .dat for the free map, and room for the expiries and
    # for entries spilled at the cap
    kept = 12 * idx._SPILL_ROOM
    assert room == pages * idx._PAGE + 4 * 1 + snap._snapshot_room(0, 3, 0, blocks) + kept
    assert free_map == b"\0\0\0\1"  # the header, k0, k1, then k2's block
    # the map up to its last free block; the free extent's key, which fitted
    assert os.path.getsize(f"{path}.idx") == saved == room - kept - (blocks - 4) + 8


def test_a_close_with_no_room_for_the_free_extents_leaves_them_to_the_map(path):
    CAP = MIN_STORE_BYTES * 4  # (enough extents to need more than the room a set() keeps)
    with DataStore(path, max_bytes=CAP) as s:
        count = fill(s, "k", size=100)
        for i in range(0, count, 2):  # an extent a deleted key: no room for their keys
            s.delete(f"k{i:05d}")
        assert files_size(path) <= counted_size(s) <= CAP
        extents = s._engine.free.extents()
        assert s._engine.used() + 8 * len(extents) > CAP
    assert files_size(path) <= CAP
    with DataStore(path, max_bytes=CAP) as s:
        assert s._engine.free.extents() == extents  # found in the map
        assert s._engine.free.fitting(1) == extents[0][0]
        for i in range(0, count, 2):  # each one room for a value of its size again
            s.create(f"k{i:05d}", {"pad": "y" * 100})
        assert len(s) == count


def test_a_snapshot_of_another_close_is_not_trusted(path, caplog):
    make_store(path, 5)
    old = Path(f"{path}.idx").read_bytes()
    with DataStore(path) as s:
        s.create("later", {})
    Path(f"{path}.idx").write_bytes(old)  # a backup of .idx, restored on its own
    with DataStore(path) as s:
        assert len(s) == 6 and s.read("later") == {}
    assert "closed cleanly" in caplog.text  # found, and said, as damage


def test_the_header_of_dat_marks_closed_only_after_idx_is_durable(path, monkeypatch):
    events = []
    real_pwrite, real_fsync = os.pwrite, os.fsync

    def pwrite(fd, data, pos):
        if pos == 0 and bytes(data[:8]) == fmt._HEADER_MAGIC and data[8] == fmt._CLOSED:
            events.append("dat closed")
        elif pos == 0 and bytes(data[:8]) == idx._IDX_MAGIC and data[8] == fmt._CLOSED:
            events.append("idx closed")
        return real_pwrite(fd, data, pos)

    def fsync(fd):
        events.append(f"fsync {Path(os.readlink(f'/proc/self/fd/{fd}')).suffix}")
        return real_fsync(fd)

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc")
    s = DataStore(path)
    s.create("k", {})
    monkeypatch.setattr(os, "pwrite", pwrite)
    monkeypatch.setattr(os, "fsync", fsync)
    s.close()
    assert events == ["fsync .dat", "fsync .idx", "idx closed", "fsync .idx",
                      "dat closed", "fsync .dat"]


@pytest.mark.parametrize("edit", [
    pytest.param(lambda f, fr, k, e, pl: (f[:1] + [0] * (len(f) - 1), [], [], [], []),
                 id="no-record-counted"),
    pytest.param(lambda f, fr, k, e, pl: (f[:2] + [99] + f[3:], fr, k, e * 33, pl * 33),
                 id="more-expiring-than-keys"),
])
def test_a_snapshot_that_does_not_add_up_is_corrupt_store_error(path, edit):
    store_with_a_hole_and_ttls(path)
    rewrite_trusted_snapshot(path, edit)
    with pytest.raises(CorruptStoreError, match="store.idx is damaged"):
        DataStore(path)


def test_a_snapshot_cut_shorter_than_its_fields_is_corrupt_store_error(path):
    store_with_a_hole_and_ttls(path)
    data = bytearray(Path(f"{path}.idx").read_bytes())
    header = list(idx._IDX_HEADER.unpack_from(data))
    depth, pages = header[2], header[3]
    tail = bytes(data[pages * idx._PAGE:pages * idx._PAGE + (4 << depth)]) + b"\0" * 10
    data[pages * idx._PAGE:] = tail
    header[6:8] = [len(tail), zlib.crc32(tail)]
    packed = idx._IDX_HEADER.pack(*header[:-1], 0)[:-4]
    data[:idx._IDX_HEADER.size] = packed + zlib.crc32(packed).to_bytes(4, "little")
    Path(f"{path}.idx").write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="cut short"):
        DataStore(path)


def test_an_expiry_that_the_record_does_not_hold_never_deletes_it(path):
    # A snapshot that lies (CRCs made to match) lists k0, which has no ttl,
    # as expired: the write that would reclaim it finds out, and the store
    # reads .dat again instead; k0 stays.
    store_with_a_hole_and_ttls(path)
    with DataStore(path) as s:
        k0 = s._engine.lookup(b"k0")
    rewrite_trusted_snapshot(path, lambda f, fr, k, e, pl: (
        f[:2] + [f[2] + 1] + f[3:], fr, k, [1] + e, [k0 & fmt._SLOT_MASK] + pl))
    with DataStore(path) as s:
        s.create("new", {})
        assert s.read("k0") == {"i": 0} and s.read("new") == {}
        assert sorted(s.keys()) == ["k0", "k1", "k3", "k4", "k5", "new"]


@pytest.mark.parametrize("where", ["k0", "past-the-end"])
def test_a_free_extent_that_lies_is_dropped_and_never_written_over(path, where):
    # A snapshot that lies (CRCs made to match) gives k0's block, or one past
    # the end of .dat, in place of the free one, as a free extent: the map
    # says otherwise, so the best fit drops it, and the create goes
    # elsewhere; k0 stays.
    store_with_a_hole_and_ttls(path)
    with DataStore(path) as s:
        k0 = fmt._slot_block(s._engine.lookup(b"k0"))
    block = k0 if where == "k0" else 10 ** 6
    rewrite_trusted_snapshot(path, lambda f, fr, k, e, pl: (f, fr, [1 << 32 | block], e, pl))
    with DataStore(path) as s:
        s.create("new", {})
        assert s.read("k0") == {"i": 0} and s.read("new") == {}
        assert fmt._slot_block(s._engine.lookup(b"new")) not in (k0, block)
        assert sorted(s.keys()) == ["k0", "k1", "k3", "k4", "k5", "new"]


def store_with_holes(path):
    with DataStore(path) as s:
        for i in range(10):
            s.create(f"k{i}", {"i": i, "pad": "x" * (60 if i == 7 else 0)})
        for i in (2, 5, 7):  # free runs of 1, 1 and 2 blocks
            s.delete(f"k{i}")
    return {f"k{i}": {"i": i, "pad": "x" * (60 if i == 7 else 0)} for i in (0, 1, 3, 4, 6, 8, 9)}


def test_free_extents_out_of_order_never_hang_a_create(path):
    # Keys made to lie, and out of order, so that a liar cannot be dropped:
    # the create finds out, the store reads .dat again, and the create goes on.
    content = store_with_holes(path)
    rewrite_trusted_snapshot(path, lambda f, fr, k, e, pl: (
        f, fr, [3 << 32 | 7, 1 << 32 | 3, 1 << 32 | 9], e, pl))
    done = []
    with DataStore(path) as s:
        worker = threading.Thread(target=lambda: done.append(s.create("new", {"v": 1})))
        worker.start()
        worker.join(30)
        assert not worker.is_alive() and done == [None]
        assert live_content(s) == dict(content, new={"v": 1})


def test_a_free_extent_that_lies_and_is_never_met_keeps_only_its_run_from_use(path):
    content = store_with_holes(path)
    with DataStore(path) as s:
        real = s._engine.free.extents()
    assert [length for _, length in real] == [1, 1, 2]
    # k2's run has a liar for a key (block 1, which k0 holds); k5's and k7's
    # keep theirs
    rewrite_trusted_snapshot(path, lambda f, fr, k, e, pl: (
        f, fr, [1 << 32 | 1, k[1], k[2]], e, pl))
    with DataStore(path) as s:
        s.delete("k6")  # merges k5's and k7's runs
        s.create("new", {"v": 1})  # into the merged run, never k0's block
        assert s.read("k0") == {"i": 0, "pad": ""}
    with DataStore(path) as s:  # not refused
        del content["k6"]
        assert live_content(s) == dict(content, new={"v": 1})
        free = s._engine.free
        assert free.extents() == [real[0], (real[1][0] + 1, 3)]  # as the map has them
        assert free.fitting(1) == real[0][0]  # (that close saved keys from the map)
