"""White-box tests of datastore.index: the extendible hash table in .idx,
held to a dict of hash -> places through random operations, its bulk
build, what a clean close saves and the next open trusts, and the damage
it finds. What a user sees of it (a damaged or missing .idx rebuilt, the
memory a key costs) is in test_datastore.py."""

import os
import random
import struct
import time
from collections import defaultdict
from pathlib import Path

import pytest

from datastore import CorruptStoreError, DataStore
from datastore import index as idx
from datastore.errors import _StoreFull


@pytest.fixture
def index(tmp_path):
    fd = os.open(tmp_path / "store.idx", os.O_RDWR | os.O_CREAT, 0o600)
    made = idx._Index(fd, str(tmp_path / "store.idx"))
    made.build([], [])
    yield made
    made.close()
    os.close(fd)


def assert_holds(index, model):
    for h, places in model.items():
        assert sorted(index.find(h)) == sorted(places)
    assert sorted(index.places()) == sorted(p for places in model.values() for p in places)
    assert index.count == sum(map(len, model.values()))


def add(index, model, h, place):
    index.make_room(h)
    index.add(h, place)
    model[h].append(place)


def test_the_index_holds_what_a_dict_does_through_random_operations(index):
    rng = random.Random(5)
    model, next_place = defaultdict(list), 1
    hashes = [rng.getrandbits(32) for _ in range(3000)] + [7] * 20  # 20 share one hash
    for step in range(12000):
        if rng.random() < 0.65 or not index.count:
            h = rng.choice(hashes)
            add(index, model, h, next_place)
            next_place += 1
        else:
            h = rng.choice([h for h, places in model.items() if places])
            place = rng.choice(model[h])
            if rng.random() < 0.5:
                index.remove(h, place)
                model[h].remove(place)
            else:
                index.replace(h, place, next_place)
                model[h][model[h].index(place)] = next_place
                next_place += 1
        if step % 1000 == 0:
            assert_holds(index, model)
    assert_holds(index, model)
    assert index.depth >= 4 and index.pages > 10  # it split, and doubled its directory
    assert index.find(8) == [] and index.find(2 ** 32 - 1) == [] or 2 ** 32 - 1 in hashes
    with pytest.raises(CorruptStoreError, match="no entry"):
        index.remove(7, 10 ** 9)  # an entry it never had: .dat and it disagree
    assert index.damaged


def test_split_cost_is_what_making_room_takes(index):
    rng = random.Random(8)
    for _ in range(5000):
        h = rng.getrandbits(32)
        cost, before = index.split_cost(h), index.room()
        index.make_room(h)
        assert index.room() - before == cost
        index.add(h, rng.getrandbits(40) + 1)


def test_a_bulk_build_takes_no_more_pages_than_adding_one_by_one(index, tmp_path):
    rng = random.Random(9)
    entries = [(rng.getrandbits(32), place) for place in range(1, 20001)]
    for h, place in entries:
        index.make_room(h)
        index.add(h, place)
    one_by_one = index.pages
    for _ in range(2):  # (the second time, from a file that is already built)
        index.build([h for h, _ in entries], [p for _, p in entries])
        model = defaultdict(list)
        for h, place in entries:
            model[h].append(place)
        assert_holds(index, model)
        assert index.pages <= one_by_one
    assert os.path.getsize(tmp_path / "store.idx") == index.pages * idx._PAGE


def test_a_saved_index_loads_with_its_stamp_only(index):
    rng = random.Random(10)
    model = defaultdict(list)
    for place in range(1, 3001):
        add(index, model, rng.getrandbits(32), place)
    index.save(41, b"what the engine keeps")
    index.close()
    assert index.load(40, 2 ** 30) is None  # another close's
    assert index.load(41, 4 * idx._PAGE) is None  # larger than the cap: not even read
    assert index.load(41, 2 ** 30) == b"what the engine keeps"
    assert_holds(index, model)
    assert idx._keys_saved(index.fd, 41) == 3000 and idx._keys_saved(index.fd, 40) is None


def flip(data, at):
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


@pytest.mark.parametrize("damage", [
    pytest.param(lambda data: data[:-1], id="tail-cut"),
    pytest.param(lambda data: data + b"\0", id="grown"),
    pytest.param(lambda data: flip(data, 20), id="header-bit"),
    pytest.param(lambda data: flip(data, len(data) - 3), id="tail-bit"),
    pytest.param(lambda data: flip(data, len(data) - len(b"extra") - 1), id="directory-bit"),
])
def test_a_saved_index_damaged_outside_its_buckets_is_not_loaded(index, tmp_path, damage):
    for place in range(1, 500):
        h = place * 2654435761 % 2 ** 32
        index.make_room(h)
        index.add(h, place)
    index.save(5, b"extra")
    index.close()
    path = tmp_path / "store.idx"
    path.write_bytes(damage(path.read_bytes()))
    assert index.load(5, 2 ** 30) is None


def test_a_damaged_bucket_is_found_when_it_is_first_used(index, tmp_path):
    model = defaultdict(list)
    for place in range(1, 2000):
        add(index, model, (place * 2654435761) % 2 ** 32, place)
    index.save(3, b"")
    index.close()
    data = bytearray((tmp_path / "store.idx").read_bytes())
    data[2 * idx._PAGE + 500] ^= 4  # inside bucket 2
    (tmp_path / "store.idx").write_bytes(bytes(data))
    assert index.load(3, 2 ** 30) == b""  # the header and the tail are whole
    assert not index.damaged
    with pytest.raises(CorruptStoreError, match="page 2 is damaged"):
        index.places()
    assert index.damaged  # the store then reads .dat again (see test_datastore.py)


def test_more_keys_with_one_hash_than_a_bucket_holds_are_refused_unchanged(index):
    for place in range(1, idx._ENTRIES + 1):
        index.make_room(99)
        index.add(99, place)
    pages, depth = index.pages, index.depth
    for attempt in (index.split_cost, index.make_room):
        with pytest.raises(_StoreFull) as refused:
            attempt(99)
        assert "share the first 24 bits" in refused.value.reason
    assert (index.pages, index.depth) == (pages, depth)  # no split made in vain
    assert sorted(index.find(99)) == list(range(1, idx._ENTRIES + 1))
    index.make_room(2 ** 31)  # a hash that differs in its first bits still goes in
    index.add(2 ** 31, 10 ** 6)
    assert index.find(2 ** 31) == [10 ** 6]


@pytest.mark.parametrize("part", [0, 0.5], ids=["nothing-written", "half-written"])
def test_a_split_whose_write_fails_leaves_the_index_and_its_file_as_they_were(
        index, monkeypatch, part):
    # The disk is full at once, or fills half-way through the new page: what
    # was written of it is cut away, as nothing counts it against max_bytes.
    model = defaultdict(list)
    h = 0
    while index.split_cost(h) == 0:
        add(index, model, h, h + 1)
        h += 2 ** 20 + 1
    pages, size, real_pwrite = index.pages, os.fstat(index.fd).st_size, os.pwrite

    def failing(fd, data, pos):
        if int(len(data) * part) < 1:
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, bytes(data)[:int(len(data) * part)], pos)
    monkeypatch.setattr(os, "pwrite", failing)
    with pytest.raises(OSError):
        index.make_room(h)
    monkeypatch.undo()
    assert index.pages == pages and not index.damaged
    assert os.fstat(index.fd).st_size == size == index.pages * idx._PAGE
    assert_holds(index, model)
    add(index, model, h, h + 1)
    assert_holds(index, model)


def test_a_file_larger_than_the_cap_is_not_read(index, monkeypatch):
    for place in range(1, 100):
        index.make_room(place << 20)
        index.add(place << 20, place)
    index.save(9, b"")
    index.close()
    os.truncate(index.path, 2 ** 40)  # sparse, claiming a terabyte
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: reads.append(n) or real_pread(fd, n, at))
    assert index.load(9, 2 ** 30) is None
    assert sum(reads) < 2 ** 20


def test_buckets_that_do_not_hold_what_the_header_says_are_not_loaded(index, tmp_path):
    for place in range(1, 1000):
        h = place * 2654435761 % 2 ** 32
        index.make_room(h)
        index.add(h, place)
    index.save(4, b"")
    index.close()
    data = bytearray((tmp_path / "store.idx").read_bytes())
    data[idx._PAGE + 6] += 1  # bucket 1's count, with its CRC left stale
    (tmp_path / "store.idx").write_bytes(bytes(data))
    assert index.load(4, 2 ** 30) is None
    assert index.pages == 0 and index.count == 0  # nothing kept for the scan to trip on


def bucket_of(path, key):
    data = Path(f"{path}.idx").read_bytes()
    _, _, depth, pages, *_ = idx._IDX_HEADER.unpack_from(data)
    directory = struct.unpack_from(f"<{1 << depth}I", data, pages * idx._PAGE)
    return directory[idx._hash(key.encode()) >> (32 - depth)]


@pytest.mark.parametrize("call", ["create", "delete"])
def test_a_damaged_bucket_found_after_a_write_commits_does_not_fail_it(tmp_path, call):
    # The write's upkeep reclaims the expired "x", whose bucket is damaged:
    # found after the write's commit point, it must not fail (nor repeat) it.
    path = tmp_path / "store"
    with DataStore(path) as s:
        for i in range(1500):
            s.create(f"k{i}", {"i": i})
        s.create("x", {}, ttl=1)
    damaged = bucket_of(path, "x")
    new = next(f"y{i}" for i in range(10000) if bucket_of(path, f"y{i}") != damaged)
    victim = next(f"k{i}" for i in range(1500) if bucket_of(path, f"k{i}") != damaged)
    with open(f"{path}.idx", "r+b") as f:
        f.seek(damaged * idx._PAGE + idx._PAGE - 1)  # a byte past its entries
        f.write(b"\x01")
    with DataStore(path) as s:
        s._clock = lambda: time.time() + 10  # "x" has expired
        if call == "create":
            s.create(new, {"new": 1})
            assert s.read(new) == {"new": 1}
        else:
            s.delete(victim)
            assert victim not in s
        assert "x" not in s and len(s) == 1500 - (call == "delete") + (call == "create")
