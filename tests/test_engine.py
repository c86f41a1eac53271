"""White-box tests of datastore.engine: how each call changes the files.

The upkeep each call does (reclaiming expired keys, moving records down) and
its bounds; the order of writes and fsyncs that makes a crash safe; making
room for a write; and every write, fsync and truncate failing in turn (the
files must then still match what the engine holds in memory, and scan
clean). The tests that need only the engine open an _Engine directly; those
that need the facade (a crash left by abandon(), errors, reopening) go
through DataStore.
"""

import errno
import itertools
import logging
import os
import random
import shutil

import pytest

from datastore import (
    MAX_STORE_BYTES, MIN_STORE_BYTES, DataStore, StoreClosedError, StoreFullError, codec,
)
from datastore import engine as engine_module
from datastore import format as fmt
from datastore.engine import _Engine
from tests.support import (
    SLOW, abandon, assert_files_match_memory, counted_size, files_size, fill, indexed,
    live_content,
)


def put(engine, key, value, now, ttl=None):
    """What DataStore.set(key, value, ttl) asks of the engine at time `now`."""
    key, key_bytes = codec._encode_key(key)
    engine.put(key_bytes, codec._encode_value(key, value), codec._expiry(key, ttl, now), now)


def delete(engine, key, now):
    """What DataStore.delete(key) asks of the engine, for a live key."""
    assert engine.remove(key.encode(), now)


def test_expired_keys_are_reclaimed_a_few_per_call(path, clock):
    engine = _Engine(str(path), MAX_STORE_BYTES).open()
    for i in range(2000):
        put(engine, f"k{i}", {"i": i}, clock(), ttl=10)
    clock.advance(10)
    put(engine, "first", {}, clock())
    reclaimed = 2000 - sum(key.startswith(b"k") for key, _ in indexed(engine))
    assert 0 < reclaimed <= engine_module._RECLAIM_BATCH
    for i in range(2000 // engine_module._RECLAIM_BATCH):
        put(engine, f"more{i}", {}, clock())
    assert not any(key.startswith(b"k") for key, _ in indexed(engine))
    engine.close(clock())


def test_a_delete_writes_one_free_marker_and_moves_no_record(path, monkeypatch, clock):
    engine = _Engine(str(path), MAX_STORE_BYTES).open()
    for i in range(3000):
        put(engine, f"k{i}", {"i": i, "pad": "x" * (i % 7 * 100)}, clock())
    before = files_size(path)
    real = os.pwrite
    writes = []
    monkeypatch.setattr(os, "pwrite", lambda *args: writes.append(args[2]) or real(*args))
    for i in range(0, 2999):  # all but the last: none of them at the end of .dat
        writes.clear()
        delete(engine, f"k{i}", clock())
        assert len(writes) == 1  # the marker over the record's head, no copy
    monkeypatch.undo()
    assert files_size(path) == before  # the free space waits for creates
    for i in range(2000):  # which take it, without growing the file
        put(engine, f"n{i}", {"i": i}, clock())
    assert files_size(path) == before
    delete(engine, "k2999", clock())  # the record at the end: .dat is cut back
    assert files_size(path) < before
    engine.close(clock())


def test_set_over_a_durable_value_fsyncs_the_new_one_before_giving_up_the_old(
        path, monkeypatch, clock):
    calls = []
    engine = _Engine(str(path), MAX_STORE_BYTES).open()
    put(engine, "k", {"v": "old"}, clock())
    engine.sync()
    for name in ("pwrite", "fsync"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, name=name, real=real:
                            calls.append((name, bytes(a[1][:8]) if name == "pwrite" else None))
                            or real(*a))
    put(engine, "k", {"v": "new"}, clock())
    monkeypatch.undo()
    assert engine.get(b"k", clock()) == b'{"v":"new"}'
    engine.close(clock())
    new_record = calls.index(("pwrite", fmt._MAGIC + bytes([fmt._VALUE, 1, 0, 0])))
    old_invalidated = calls.index(("pwrite", fmt._MAGIC + bytes([fmt._FREE, 0, 0, 0])))
    assert new_record < calls.index(("fsync", None)) < old_invalidated


def test_set_of_the_record_that_making_room_moves_keeps_the_new_value(path):
    with DataStore(path, max_bytes=MIN_STORE_BYTES) as s:
        count = fill(s, "k", size=100)  # three blocks each; the last one ends .dat
        last = f"k{count - 1:05d}"
        assert max((slot for _, slot in indexed(s._engine)),
                   key=lambda slot: slot & fmt._SLOT_MASK) == s._engine.lookup(last.encode())
        for i in (3, 5, 7, 9):  # three-block holes: room for the last records only
            s.delete(f"k{i:05d}")
        s.set(last, {"pad": "x" * 250})  # five blocks: room only once that record moves
        assert_files_match_memory(s)
        assert s.read(last) == {"pad": "x" * 250}
        abandon(s)
    with DataStore(path, max_bytes=MIN_STORE_BYTES) as s:
        assert s.read(last) == {"pad": "x" * 250}
        s.delete(last)
        abandon(s)
    with DataStore(path, max_bytes=MIN_STORE_BYTES) as s:
        assert last not in s and len(s) == count - 5


def test_a_record_written_into_a_free_tail_survives_a_failed_append(path, clock, monkeypatch):
    s = DataStore(path)
    s._clock = clock
    s.create("a", {"v": "a" * 100})
    s.create("b", {"v": "b" * 100}, ttl=1)  # the last record; it ends mid-block
    clock.advance(1)
    s.set("b", {"v": "B" * 400})  # into b's extent, past the old end of .dat
    assert_files_match_memory(s)
    end = fmt._blocks(s._engine.dat_size) * fmt._BLOCK
    real = os.pwrite
    monkeypatch.setattr(os, "pwrite", lambda fd, data, pos: real(fd, data, pos) if pos < end
                        else (_ for _ in ()).throw(OSError(errno.ENOSPC, "injected")))
    with pytest.raises(OSError, match="injected"):
        s.create("c", {"v": "c" * 100})  # an append that fails, and is undone
    monkeypatch.undo()
    assert s.read("b") == {"v": "B" * 400}
    assert_files_match_memory(s)
    s.close()


def test_an_expired_last_record_reclaimed_for_room_is_cut_away(path, clock):
    with DataStore(path, max_bytes=MIN_STORE_BYTES) as s:
        s._clock = clock
        count = fill(s, "k", size=100)
        s.delete(f"k{count - 1:05d}")  # its end of .dat is cut away ...
        s.create("e", {"pad": "e" * 100}, ttl=1)  # ... and this one ends .dat now
        clock.advance(1)
        with pytest.raises(StoreFullError):  # reclaiming e cannot make that much room
            s.create("big", {"pad": "b" * 3000})
        assert "e" not in s
        assert_files_match_memory(s)  # e's blocks did not stay at the end of .dat


def test_after_a_failed_fsync_the_same_call_writes_nothing_more(path, monkeypatch):
    s = DataStore(path)
    s._engine._move = lambda limit: 0
    for i in range(40):
        s.create(f"k{i}", {"p": "x" * 300})
    for i in range(30):
        s.delete(f"k{i}")  # most of .dat free: the next write would move records
    del s._engine._move
    s.sync()  # and every record durable, so a set must fsync before invalidating
    log = []
    real_pwrite = os.pwrite

    def failing_fsync(fd):
        log.append("fsync")
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    monkeypatch.setattr(os, "pwrite", lambda *a: log.append("pwrite") or real_pwrite(*a))
    s.set("k35", {"p": "y" * 300})  # it committed: it returns
    monkeypatch.undo()
    assert "fsync" in log and "pwrite" not in log[log.index("fsync"):]
    assert s.read("k35") == {"p": "y" * 300}
    s.close()
    with DataStore(path) as s:
        assert s.read("k35") == {"p": "y" * 300} and len(s) == 10


@pytest.mark.parametrize("seed", [pytest.param(1, id="seed-1"),
                                  pytest.param(3, id="seed-3", marks=SLOW),
                                  pytest.param(6, id="seed-6", marks=SLOW)])
def test_the_files_match_memory_after_every_call_of_a_random_workload(path, clock, seed):
    rng = random.Random(seed)
    live = {}
    with DataStore(path, max_bytes=MIN_STORE_BYTES * 2) as s:
        s._clock = clock
        for i in range(1500):
            roll = rng.random()
            try:
                if live and roll < 0.25:  # set: making room may move the very record replaced
                    key, value = rng.choice(sorted(live)), {"pad": "s" * rng.randrange(1500)}
                    s.set(key, value)
                    live[key] = value
                elif live and roll < 0.5:
                    key = rng.choice(sorted(live))
                    del live[key]
                    s.delete(key)
                elif roll < 0.52:
                    s.compact()
                elif roll < 0.55:
                    clock.advance(rng.choice([0.5, 5]))
                    live = {k: v for k, v in live.items() if k in s}
                else:
                    value = {"pad": "c" * rng.randrange(1500)}
                    s.create(f"k{i}", value, ttl=rng.choice([None, None, 2]))
                    live[f"k{i}"] = value
            except StoreFullError:
                pass
            assert_files_match_memory(s)
        assert live_content(s) == live


@pytest.mark.parametrize("synced", [pytest.param(True, id="after-sync"),
                                    pytest.param(False, id="not-synced")])
def test_a_durable_record_is_moved_only_after_its_copy_is_fsynced(path, monkeypatch, clock,
                                                                  synced):
    calls = []
    engine = _Engine(str(path), MAX_STORE_BYTES).open()
    for i in range(40):
        put(engine, f"k{i}", {"i": i}, clock())
    engine._move = lambda limit: 0
    for i in range(0, 40, 2):
        delete(engine, f"k{i}", clock())
    del engine._move
    if synced:
        engine.sync()
    for name in ("pwrite", "fsync", "ftruncate"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, name=name, real=real:
                            calls.append(name) or real(*a))
    engine.compact(clock())
    monkeypatch.undo()
    assert engine.free.blocks == 0
    assert {key: engine.get(key, clock()) for key, _ in indexed(engine)} == {
        b"k%d" % i: b'{"i":%d}' % i for i in range(1, 40, 2)}
    engine.close(clock())
    copies = calls.index("pwrite")
    if synced:  # copies, fsync, then the originals cut away
        assert copies < calls.index("fsync") < calls.index("ftruncate")
    else:  # nothing had reached the disk for sure: no need to wait for it
        assert "fsync" not in calls and copies < calls.index("ftruncate")


class FailingCall:
    """Make the n-th call of os.write, pwrite, fsync, ftruncate or replace
    raise OSError, as a full disk or a failing one would. A write writes
    half of its bytes first: a short write, then the error."""

    NAMES = ("write", "pwrite", "fsync", "ftruncate", "replace")

    def __init__(self, monkeypatch, n):
        self.n, self.count, self.failed = n, 0, None
        for name in self.NAMES:
            monkeypatch.setattr(os, name, self.wrap(name, getattr(os, name)))

    def wrap(self, name, real):
        def call(*args):
            self.count += 1
            if self.count == self.n:
                self.failed = name
                if name in ("write", "pwrite") and len(args[1]) > 1:
                    real(args[0], args[1][:len(args[1]) // 2], *args[2:])
                code = errno.EIO if name == "fsync" else errno.ENOSPC
                raise OSError(code, f"injected failure of os.{name}")
            return real(*args)
        return call


def store_for_io_errors(path, clock):
    """A store with free extents, records after them and expired keys."""
    with DataStore(path, max_bytes=MIN_STORE_BYTES * 2) as s:
        s._clock = clock
        s._engine._move = lambda limit: 0
        for i in range(30):
            s.create(f"k{i}", {"i": i, "pad": "x" * (i % 5 * 300)})
        for i in range(0, 30, 3):
            s.delete(f"k{i}")
        for i in range(5):
            s.create(f"t{i}", {"i": i}, ttl=1)
        clock.advance(1)  # the t keys have expired; close() reclaims them
        s.create("t9", {"i": 9}, ttl=1)
        return live_content(s)


IO_OPERATIONS = {  # the call, and how it changes what the store holds
    "create": (lambda s: s.create("new", {"pad": "n" * 900}),
               lambda c: dict(c, new={"pad": "n" * 900})),
    "create-at-the-end": (lambda s: s.create("big", {"pad": "b" * 9000}),  # fits no free extent
                          lambda c: dict(c, big={"pad": "b" * 9000})),
    "create-over-expired": (lambda s: s.create("t9", {"v": "again"}),
                            lambda c: dict(c, t9={"v": "again"})),
    "delete": (lambda s: s.delete("k29"), lambda c: {k: v for k, v in c.items() if k != "k29"}),
    "compact": (lambda s: s.compact(), lambda c: c),
    # (a store written to since open: close() saves .idx)
    "close": (lambda s: setattr(s._engine, "changed", True) or s.close(), lambda c: c),
}


@pytest.mark.parametrize("operation", list(IO_OPERATIONS))
def test_each_write_fsync_and_truncate_failing_in_turn(tmp_path, monkeypatch, operation,
                                                       clock, caplog):
    template = tmp_path / "template" / "store"
    before = store_for_io_errors(template, clock)
    before.pop("t9")
    clock.advance(1)  # "t9" has expired too
    call, change = IO_OPERATIONS[operation]
    after = change(before)
    n = 1
    while True:
        path = tmp_path / f"n{n}" / "store"
        shutil.copytree(template.parent, path.parent)
        s = DataStore(path, max_bytes=MIN_STORE_BYTES * 2)
        s._clock = clock
        with monkeypatch.context() as patch:
            fault = FailingCall(patch, n)
            try:
                call(s)
                raised = None
            except OSError as exc:
                raised = exc
        assert (raised is None) or fault.failed, raised
        if operation != "close":
            assert files_size(path) <= counted_size(s) <= s.max_bytes
            content = live_content(s)
            assert content == (before if raised else after), (fault.failed, n)
            assert_files_match_memory(s, trimmed=False)
            if s._engine.failed:  # an fsync failed: writes wait for a reopen
                with pytest.raises(OSError, match="open it again"):
                    s.create("probe", {})
            else:  # the store still works
                s.create("probe", {"v": 1})
                s.delete("probe")
            abandon(s)  # then a crash: what the failure left must scan clean
        else:  # closed either way, lock released
            content = before
            with pytest.raises(StoreClosedError):
                s.read("k1")
        assert files_size(path) <= MIN_STORE_BYTES * 2
        caplog.clear()
        caplog.set_level(logging.INFO, logger="datastore")
        with DataStore(path, max_bytes=MIN_STORE_BYTES * 2) as again:
            again._clock = clock
            assert live_content(again) == content
        assert "skipped" not in caplog.text, (fault.failed, n)  # no write was in flight
        with DataStore(path, max_bytes=MIN_STORE_BYTES * 2) as again:  # after close
            again._clock = clock
            assert live_content(again) == content
            for key in list(again):
                again.delete(key)
            abandon(again)  # no copy the failure left behind may come back
        with DataStore(path, max_bytes=MIN_STORE_BYTES * 2) as again:
            again._clock = clock
            assert live_content(again) == {}
        if fault.failed is None:
            break
        n += 1
    assert n > {"create": 2, "create-at-the-end": 2, "delete": 2, "compact": 5,
                "close": 5}.get(operation, 2)


# --- compact(): the smallest layout --------------------------------------

def make_stuck(store, rounds):
    """Small records k0, k1, ... between free extents of 112 blocks, then a
    16 KiB record, "big", at the end that fits none of them: moving records
    from the end stops at once, and compact() must sweep."""
    store._engine._move = lambda limit: 0  # no upkeep while the holes are made
    for r in range(rounds):
        store.create(f"k{r}", {"v": r})
        for f in range(28):
            store.create(f"fill{r}-{f}", {"v": "f" * 200})  # 4 blocks
    store.create("big", {"v": "x" * 16000})  # the last record: 251 blocks
    for r in range(rounds):
        for f in range(28):
            store.delete(f"fill{r}-{f}")
    del store._engine._move


def test_compact_packs_records_that_fit_no_free_extent_at_the_end(tmp_path):
    cap = 256 * 1024
    with DataStore(tmp_path / "store", max_bytes=cap) as s:
        make_stuck(s, 14)
        s.compact()
        report = s.check()
        big = s._engine.largest * fmt._BLOCK
        assert report["dead_bytes"] < os.path.getsize(tmp_path / "store.dat") // 16 + big
        assert os.path.getsize(tmp_path / "store.dat") < 20 * fmt._BLOCK + 16 * 1024 + 4096
        live = 14 * fmt._BLOCK + big
        count = 0
        while live + big <= 0.9 * cap:  # a 16 KiB value fits in 90% of the cap
            s.create(f"more{count}", {"v": "y" * 16000})
            live += big
            count += 1
        assert count >= 5


def test_an_error_part_way_through_compact_leaves_no_copy_untracked(tmp_path, monkeypatch):
    """The sweep's copies made before a full disk stopped it: their originals
    must still be invalidated, or a delete and a kill -9 bring keys back."""
    path = tmp_path / "store"
    with DataStore(path) as s:
        make_stuck(s, 6)
    s = DataStore(path)
    end = s._engine.dat_size
    real, appended = os.pwrite, []

    def full_after_two_copies(fd, data, pos):
        if pos >= end and len(data) > 32:
            appended.append(pos)
            if len(appended) == 3:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, pos)
    monkeypatch.setattr(os, "pwrite", full_after_two_copies)
    with pytest.raises(OSError):
        s.compact()
    monkeypatch.undo()
    s.delete("k1")
    s.delete("k2")
    abandon(s)
    with DataStore(path) as s:
        assert "k1" not in s and "k2" not in s
        assert sorted(s.keys()) == ["big", "k0", "k3", "k4", "k5"]


def test_compact_fsyncs_its_copies_before_it_frees_their_originals(tmp_path, monkeypatch):
    path = tmp_path / "store"
    with DataStore(path) as s:
        make_stuck(s, 6)
    with DataStore(path) as s:
        end = s._engine.dat_size
        originals = {fmt._slot_block(slot) * fmt._BLOCK for _, slot in indexed(s._engine)}
        real_pwrite, real_fsync, unsynced, checked = os.pwrite, os.fsync, [], []

        def pwrite(fd, data, pos):
            if pos >= end:
                unsynced.append(pos)  # a copy at the end, not yet durable
            elif pos in originals and data[4] == fmt._FREE:
                checked.append(pos)
                assert not unsynced, "an original freed before its copy was fsynced"
            return real_pwrite(fd, data, pos)
        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "fsync", lambda fd: unsynced.clear() or real_fsync(fd))
        s.compact()
        monkeypatch.undo()
        assert checked  # the sweep did free originals


def test_at_the_cap_a_key_whose_bucket_is_full_waits_beside_it(tmp_path):
    """A full bucket splits into a new 4 KiB page; on a store at its cap
    there may be no room for one, yet the record a delete freed must make
    room for one more value of its size: the entry is spilled beside the
    buckets (12 bytes in the snapshot) until the index is rebuilt."""
    from datastore import index as idx
    path, cap = tmp_path / "store", MIN_STORE_BYTES * 8
    s = DataStore(path, max_bytes=cap)
    count = fill(s, "k", size=100)
    ix = s._engine.index

    def bucket(key):
        return ix.directory[idx._hash(key.encode()) >> ix.shift]

    target = bucket("k00000")
    others = [f"k{i:05d}" for i in range(count) if bucket(f"k{i:05d}") != target]
    candidates = (f"p{i}" for i in itertools.count() if bucket(f"p{i}") == target)
    added = []
    while ix.u32[(target << 10) + 1] >> 16 < idx._ENTRIES:  # fill that bucket, at the cap
        s.delete(others.pop())
        added.append(next(candidates))
        s.create(added[-1], {"pad": "x" * 100})
    assert not ix.spilled and cap - counted_size(s) < idx._PAGE  # no room for a page
    s.delete(others.pop())
    added.append(next(candidates))
    s.create(added[-1], {"pad": "x" * 100})  # its bucket is full: spilled
    assert sum(map(len, ix.spilled.values())) == 1
    assert files_size(path) <= counted_size(s) <= cap
    abandon(s)  # a crash: the scan's rebuild has no more room for a page, and spills too
    s = DataStore(path, max_bytes=cap)
    assert s._engine.index.spilled and s.read(added[-1]) == {"pad": "x" * 100}
    assert files_size(path) <= counted_size(s) <= cap
    s.compact()  # and so does compact()'s, within the cap
    assert files_size(path) <= counted_size(s) <= cap
    s.close()
    with DataStore(path, max_bytes=cap) as s:  # saved with the snapshot
        ix = s._engine.index
        page = ix.directory[idx._hash(added[0].encode()) >> ix.shift]
        assert [ix.directory[h >> ix.shift] for h in ix.spilled] == [page]
        s.delete(added[0])  # room in that bucket: the entry goes back into it
        assert not ix.spilled and s.read(added[-1]) == {"pad": "x" * 100}
        assert ix.count == len(s)
        s.compact()
        assert not ix.spilled and s.read(added[-1]) == {"pad": "x" * 100}
    with DataStore(path, max_bytes=cap) as s:
        assert sorted(added[1:]) == sorted(k for k in s.keys() if k.startswith("p"))


def test_compact_counts_each_copy_it_appends_as_an_append_does(tmp_path, monkeypatch):
    # A copy appended by compact()'s sweep takes its blocks in .dat and a byte
    # each in the snapshot's free map. With max_bytes just short of that for
    # the 30-block record at the end, the sweep must not copy it.
    template = tmp_path / "template" / "store"
    with DataStore(template, max_bytes=1 << 20) as s:
        for i in range(300):
            s.create(f"a{i:04d}", {"v": "x" * 100})  # a block each
        for i in range(300):
            if i % 3:
                s.delete(f"a{i:04d}")  # one-block holes, which "big" fits none of
        s.create("big", {"v": "y" * 15000})
        blocks = fmt._blocks(s._engine.lookup(b"big") & 0xFFFF)
    copies, real_copy = [], _Engine._copy

    def copy(engine, key, record, target, block):
        before = engine.used()
        slot = real_copy(engine, key, record, target, block)
        copies.append((key, before, engine.used(), engine.max_bytes))
        return slot
    monkeypatch.setattr(_Engine, "_copy", copy)
    path = tmp_path / "dry" / "store"
    shutil.copytree(template.parent, path.parent)
    with DataStore(path, max_bytes=1 << 20) as s:
        s.compact()
    before = next(before for key, before, _, _ in copies if key == b"big")
    path = tmp_path / "tight" / "store"
    shutil.copytree(template.parent, path.parent)
    copies.clear()
    with DataStore(path, max_bytes=before + blocks * fmt._BLOCK) as s:
        s.compact()
        assert files_size(path) <= counted_size(s) <= s.max_bytes
    assert copies and all(after <= cap for _, _, after, cap in copies)
    assert b"big" in [key for key, _, _, _ in copies]  # (the sweep reached it)


def test_an_interrupt_as_the_first_write_cuts_the_old_snapshot_never_passes_for_a_clean_close(
        path, monkeypatch, caplog):
    with DataStore(path) as s:
        for i in range(50):
            s.create(f"k{i}", {"i": i})
    real_drop = engine_module._Index.drop_tail

    def drop_tail(index):
        real_drop(index)
        raise KeyboardInterrupt  # after .idx is cut, before the write goes on
    s = DataStore(path)
    monkeypatch.setattr(engine_module._Index, "drop_tail", drop_tail)
    with pytest.raises(KeyboardInterrupt):
        s.create("new", {})
    monkeypatch.undo()
    s.close()  # writes a snapshot: the one .idx held is gone
    caplog.set_level(logging.INFO, logger="datastore")
    with DataStore(path) as s:
        assert len(s) == 50 and "new" not in s
    assert not caplog.records  # trusted: no scan, no warning of damage


def test_creates_far_from_the_cap_skip_the_count_yet_never_take_more_than_is_left(
        tmp_path, monkeypatch, clock):
    # A create of a new key far from the cap takes its room out of the
    # engine's credit instead of adding up used(): here most of them do, and
    # after every call the credit is still no more than the room left, which
    # an undercounted append, expiry or bucket split would break.
    counts, real_used = [0], _Engine.used

    def used(engine):
        counts[0] += 1
        return real_used(engine)
    monkeypatch.setattr(_Engine, "used", used)
    rng = random.Random(5)
    with DataStore(tmp_path / "s", max_bytes=1 << 20) as s:
        s._clock = clock
        creates = 0
        for i in range(3000):
            try:
                if i % 7 == 0 and len(s):
                    s.delete(rng.choice(s.keys()))
                else:
                    s.create(f"k{i}", {"v": "x" * rng.choice([0, 50, 500, 3000])},
                             ttl=rng.choice([None, 60]))
                    creates += 1
            except StoreFullError:
                break
            engine = s._engine
            assert engine.credit <= engine.max_bytes - real_used(engine)
        else:
            pytest.fail("never full")
        assert counts[0] < creates / 4  # (the count, once per create, would be creates)
        assert files_size(s.path) <= counted_size(s) <= s.max_bytes
        assert_files_match_memory(s)


def test_a_create_far_from_the_cap_takes_from_the_credit_exactly_what_it_adds(tmp_path):
    # After one create that counts used(), the credit is the room left less
    # the block kept for a set() of the largest record; each create after it
    # takes exactly what it adds (its block and a byte of the free map, its
    # expiry, the pages of a bucket split), so that stays true, split or not.
    with DataStore(tmp_path / "s", max_bytes=1 << 20) as s:
        s.create("k0", {}, ttl=60)
        engine, pages = s._engine, s._engine.index.pages
        for i in range(1, 2000):
            s.create(f"k{i}", {}, ttl=60)
            assert engine.credit == engine.max_bytes - engine.used() - fmt._BLOCK
        assert engine.index.pages > pages + 3  # (buckets split on the way)


def test_creates_keep_room_for_a_set_of_the_largest_value_until_the_store_is_full(tmp_path):
    # Values growing to the largest a store takes, created until it is full:
    # after each, the room kept for a set() of the largest is still free (a
    # create far from the cap, counting only what it adds, could take it),
    # and at the end that set works.
    with DataStore(tmp_path / "s", max_bytes=1 << 20) as s:
        engine = s._engine
        for i in itertools.count():
            value = {"v": "x" * min(200 * i, codec.MAX_VALUE_BYTES - 8)}
            try:
                s.create(f"k{i}", value)
            except StoreFullError:
                break
            assert engine.max_bytes - engine.used() >= engine.largest * fmt._BLOCK
        s.set(f"k{i - 1}", {"v": "y" * len(value["v"])})
        assert s.read(f"k{i - 1}")["v"][0] == "y"
