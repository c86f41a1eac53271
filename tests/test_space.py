"""White-box tests of datastore.space: the free extents of .dat and the keys
that have a ttl, in order of expiry, each held to a plain model (a set of
free blocks; a dict of key -> expiry) through random operations. Neither
does I/O; how the engine uses them is in test_engine.py.
"""

import random
import tracemalloc
from array import array

import pytest

from datastore.format import _MAX_BLOCKS
from datastore.space import _LONG, _Expiries, _FreeSpace


def runs(blocks):
    """The maximal runs of consecutive blocks, as start -> length."""
    found = {}
    for block in sorted(blocks):
        if block - 1 in blocks:
            continue
        length = 1
        while block + length in blocks:
            length += 1
        found[block] = length
    return found


def test_free_extents_merge_with_their_neighbours_and_a_smallest_one_that_fits_is_found():
    rng = random.Random(5)
    free, blocks = _FreeSpace(), set()
    free.by_size._RUN = 4  # short runs: many splits and emptied runs
    for _ in range(2000):
        if free.blocks and rng.random() < 0.4:
            start, length = rng.choice(free.extents())
            if rng.random() < 0.5:  # all of it
                assert free.remove(start) == length
            else:  # its first blocks, as a record written into it takes them
                length = rng.randrange(1, length + 1)
                free.take(start, length)
            assert set(range(start, start + length)) <= blocks
            blocks -= set(range(start, start + length))
        else:
            start, length = rng.randrange(1, 300), rng.randrange(1, 50)
            if blocks & set(range(start, start + length)):
                continue  # the engine frees only blocks that are not free
            free.add(start, length)
            blocks |= set(range(start, start + length))
        extents = runs(blocks)
        if rng.random() < 0.02:  # saved at a close, loaded at the next open
            loaded = _FreeSpace()
            loaded.by_size._RUN = 4
            assert loaded.load(*free.dump())
            free = loaded
        assert dict(free.extents()) == extents  # merged with free neighbours: maximal runs
        assert free.blocks == len(blocks)
        assert free.lowest() == min(blocks, default=None)
        assert free.by_size.count == len(extents) == len(free.by_size.dump())
        for block in range(1, 360):  # found by start and by end, and nothing else
            assert free.length_at(block) == extents.get(block)
            ends = {start + length: start for start, length in extents.items()}
            assert free.start_before(block) == ends.get(block)
        for wanted in range(1, _MAX_BLOCKS + 1):
            found = free.fitting(wanted)
            fitting = [length for length in extents.values() if length >= wanted]
            if not fitting:
                assert found is None
            else:  # a smallest one (all of _LONG blocks or more are alike)
                assert found in extents and extents[found] >= wanted
                assert min(extents[found], _LONG) == min(min(fitting), _LONG)


@pytest.mark.parametrize("damage", [
    pytest.param(lambda free, keys: (free[:3] + b"\2" + free[4:], keys), id="not-0-or-1"),
    pytest.param(lambda free, keys: (b"\1" + free[1:], keys), id="the-header-free"),
    pytest.param(lambda free, keys: (free, keys[:1]), id="a-run-with-no-key"),
    pytest.param(lambda free, keys: (free, keys + keys[:1]), id="a-key-too-many"),
])
def test_a_free_space_that_makes_no_sense_is_not_loaded(damage):
    free = _FreeSpace()
    free.add(2, 3)
    free.add(9, _LONG + 40)
    assert free.dump() == (b"\0\0" + b"\1" * 3 + b"\0" * 4 + b"\1" * (_LONG + 40),
                           array("Q", [3 << 32 | 2, _LONG << 32 | 9]))
    loaded = _FreeSpace()
    assert not loaded.load(*damage(*free.dump()))
    assert loaded.blocks == 0 and loaded.fitting(1) is None


def test_taking_a_few_blocks_of_a_long_extent_costs_what_they_do_not_what_it_does():
    free = _FreeSpace()
    free.add(1, 20_000_000)  # 10 GB of .dat, free
    tracemalloc.start()
    try:
        free.take(1, 3)
        free.take(4, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000  # (remove, then add, made and wrote 20 MB)
    assert free.extents() == [(5, 20_000_000 - 4)] and free.fitting(33) == 5


def test_keys_that_lie_are_dropped_a_few_at_a_time_and_never_given():
    free = _FreeSpace()
    for start in (2, 5, 7):
        free.add(start, 1 if start < 7 else 2)
    real = free.dump()
    liars = array("Q", [1 << 32 | 3, 1 << 32 | 4, 2 << 32 | 7])  # in order; 3 and 4 lie
    loaded = _FreeSpace()
    assert loaded.load(real[0], liars)
    assert loaded.fitting(1) == 7  # blocks 3 and 4 are not free: their keys are dropped
    assert loaded.by_size.count == 1  # (runs 2 and 5 have none, till a close:)
    assert loaded.dump() == real  # it saves keys made from the map
    unordered = _FreeSpace()
    assert unordered.load(real[0], array("Q", [3 << 32 | 7, 1 << 32 | 3, 1 << 32 | 9]))
    with pytest.raises(ValueError):  # it cannot tell which to drop: the store rescans
        unordered.fitting(1)


def test_a_fragmented_free_space_costs_a_byte_a_block_and_a_few_an_extent():
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        free = _FreeSpace()
        for block in range(1, 100_000, 2):  # every other block: 50,000 extents
            free.add(block, 1)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert free.blocks == 50_000 and free.fitting(1) == 1 and free.fitting(2) is None
    assert grown < 100_000 + 12 * 50_000  # (a dict and a set of them took 180 a piece)


@pytest.mark.parametrize("loaded", [pytest.param(False, id="added"),
                                    pytest.param(True, id="loaded-then-added")])
def test_expiries_give_the_earliest_keys_first_through_adds_and_removes(loaded):
    rng = random.Random(6)
    expiries, model = _Expiries(), {}
    expiries._RUN = 4  # short runs: many splits and emptied runs
    if loaded:  # out of order, as a scan lists them
        model = {10 ** 6 + i: rng.randrange(1, 200) for i in range(300)}
        expiries.load(list(model.values()), list(model))
    for step in range(3000):
        if model and rng.random() < 0.4:
            key = rng.choice(sorted(model))
            expiries.remove(model.pop(key), key)
        else:
            key, exp = step, rng.randrange(1, 200)  # many places share an expiry
            expiries.add(exp, key)
            model[key] = exp
        assert expiries.count == len(model)
        now, limit = rng.randrange(0, 220), rng.randrange(1, 20)
        due = expiries.due(now, limit)
        assert len(set(due)) == len(due) and set(due) <= set(model)
        assert [model[key] for key in due] == sorted(
            exp for exp in model.values() if exp <= now)[:limit]  # ties in any order
        assert expiries.count_due(now) == sum(exp <= now for exp in model.values())
    key = next(iter(model))
    for exp, absent in ((model[key] + 1, key), (model[key], 10 ** 9)):
        with pytest.raises(KeyError):
            expiries.remove(exp, absent)
    assert expiries.count == len(model)


class CountedPlace(int):
    """A place that counts its comparisons (as the right-hand operand too:
    Python asks a subclass first)."""
    comparisons = 0

    def __eq__(self, other):
        CountedPlace.comparisons += 1
        return int.__eq__(self, other)

    def __ne__(self, other):
        CountedPlace.comparisons += 1
        return int.__ne__(self, other)

    def __lt__(self, other):
        CountedPlace.comparisons += 1
        return int.__lt__(self, other)

    def __gt__(self, other):
        CountedPlace.comparisons += 1
        return int.__gt__(self, other)

    __hash__ = int.__hash__


def test_removing_one_of_many_places_with_one_expiry_is_a_bisection():
    expiries = _Expiries()
    places = list(range(1000, 21000))
    expiries.load([7] * len(places), places)
    for place in (places[0], places[12345], places[-1]):
        CountedPlace.comparisons = 0
        expiries.remove(7, CountedPlace(place))
        assert 0 < CountedPlace.comparisons <= 100
    assert expiries.count == len(places) - 3
    CountedPlace.comparisons = 0
    expiries.add(7, CountedPlace(13345))
    assert 0 < CountedPlace.comparisons <= 100
    assert expiries.due(7, 5) == places[1:6]
