"""An exception that is not the store's own, arriving part-way through a write.

Ctrl-C (KeyboardInterrupt) and SystemExit from a SIGTERM handler can arrive
between any two statements. Each test here cuts one kind of write short at
every point in turn, at the entry of every function of datastore's and
right after every call into `os`, and checks that the store then holds
the content from before the write or after it, never a mix, that check()
finds nothing wrong, and that what follows survives both a clean close and
a kill -9 (as abandon() leaves the files): no deleted key comes back.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

import datastore
from datastore import DataStore

SLOW = pytest.mark.slow
SOURCES = {str(Path(datastore.__file__).resolve().parent / name)
           for name in os.listdir(Path(datastore.__file__).resolve().parent)}
OS_CALLS = ("open", "close", "pread", "pwrite", "read", "write", "lseek", "fsync",
            "ftruncate", "fstat", "stat", "link", "remove", "unlink", "rename")
NOW = 1_800_000_000.0


class Interrupter:
    """Raise KeyboardInterrupt at the `at`-th point reached (from 1), where a
    point is the entry of a function of datastore's or the return of an os
    call; with `at` 0, only count the points."""

    def __init__(self, monkeypatch, at):
        self.at, self.points, self.fired = at, 0, False
        for name in OS_CALLS:
            real = getattr(os, name)
            monkeypatch.setattr(os, name, self.after(real))

    def point(self):
        self.points += 1
        if self.points == self.at:
            self.fired = True
            raise KeyboardInterrupt(f"injected at point {self.at}")

    def after(self, real):
        def call(*args, **kwargs):
            result = real(*args, **kwargs)
            if self.on:
                self.point()
            return result
        return call

    def profile(self, frame, event, arg):
        if event == "call" and frame.f_code.co_filename in SOURCES:
            self.point()

    def run(self, action):
        self.on = True
        sys.setprofile(self.profile)
        try:
            action()
        finally:
            sys.setprofile(None)
            self.on = False

    on = False


def points_of(monkeypatch, action):
    """How many points `action` reaches."""
    counter = Interrupter(monkeypatch, 0)
    counter.run(action)
    monkeypatch.undo()
    return counter.points


def interrupt(monkeypatch, at, action):
    """Run `action`, cut short at its `at`-th point."""
    interrupter = Interrupter(monkeypatch, at)
    try:
        interrupter.run(action)
    except KeyboardInterrupt:
        pass
    finally:
        monkeypatch.undo()
    assert interrupter.fired, at


def abandon(store):
    """Leave the files as kill -9 would: closed, nothing written at close."""
    store._finalizer.detach()
    store._engine.close_files()
    store._engine = None
    store._lock.release()
    store._unregister()


def value(i, size=100):
    return {"i": i, "pad": "x" * size}


def content(store, keys):
    found = {key: store.get(key) for key in keys}
    found = {key: got for key, got in found.items() if got is not None}
    assert sorted(store.keys()) == sorted(found)
    return found


def make_base(path):
    with DataStore(path) as s:
        s._clock = lambda: NOW
        for i in range(20):
            s.create(f"k{i}", value(i, 100 + 300 * (i % 4)), ttl=100 if i < 4 else None)
        s.delete("k10")


def make_holey(path):
    """Records of one block between holes of two: the next write moves some."""
    with DataStore(path) as s:
        s._clock = lambda: NOW
        s._engine._move = lambda limit: 0  # no upkeep: leave the holes
        for i in range(80):
            s.create(f"k{i}", value(i, 100 + 600 * (i % 2)))
        for i in range(1, 79, 2):
            s.delete(f"k{i}")
        del s._engine._move


def make_stuck(path):
    """Small records between holes of 28 blocks, then a 16 KiB one at the end
    that fits none of them: compact() must sweep."""
    with DataStore(path, max_bytes=256 * 1024) as s:
        s._clock = lambda: NOW
        s._engine._move = lambda limit: 0
        for r in range(6):
            s.create(f"k{r}", value(r))
            for f in range(28):
                s.create(f"fill{r}-{f}", value(f))
        s.create("big", value(0, 16000))
        for r in range(6):
            for f in range(28):
                s.delete(f"fill{r}-{f}")
        del s._engine._move


def make_past_ttl(path):
    make_base(path)  # then opened with the clock past k0..k3's ttl


# name: (template, clock, the write, the keys it may touch, expected change)
WRITES = {
    "create": (make_base, NOW, lambda s: s.create("new", value(99)), {"new": value(99)}),
    "create-ttl": (make_base, NOW, lambda s: s.create("new", value(99), ttl=50),
                   {"new": value(99)}),
    "set-same-size": (make_base, NOW, lambda s: s.set("k5", value(55, 400)),
                      {"k5": value(55, 400)}),
    "set-larger-drop-ttl": (make_base, NOW, lambda s: s.set("k1", value(11, 3000)),
                            {"k1": value(11, 3000)}),
    "delete": (make_base, NOW, lambda s: s.delete("k6"), {"k6": None}),
    "delete-and-move": (make_holey, NOW, lambda s: s.delete("k79"), {"k79": None}),
    "compact-moving": (make_holey, NOW, lambda s: s.compact(), {}),
    "compact-sweeping": (make_stuck, NOW, lambda s: s.compact(), {}),
    "create-reclaiming": (make_past_ttl, NOW + 200, lambda s: s.create("new", value(98)),
                          {"new": value(98), **{f"k{i}": None for i in range(4)}}),
    "sync": (make_base, NOW, lambda s: s.sync(), {}),
    "close": (make_base, NOW, lambda s: s.close(), {}),
}


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    made = {}
    for make in {spec[0] for spec in WRITES.values()}:
        path = tmp_path_factory.mktemp(make.__name__) / "store"
        make(path)
        made[make] = path
    return made


def fresh(templates, make, path):
    """The template's files at path, and no lock file: every run alike."""
    for suffix in (".dat", ".idx"):
        shutil.copy(f"{templates[make]}{suffix}", f"{path}{suffix}")
    Path(f"{path}.lock").unlink(missing_ok=True)


def before_and_after(templates, make, clock, change, path):
    fresh(templates, make, path)
    with DataStore(path) as s:
        s._clock = lambda: clock
        keys = set(s.keys()) | set(change) | {"new", "k11"}
        before = content(s, keys)
    after = {key: got for key, got in {**before, **change}.items() if got is not None}
    if "k0" in change:  # expired ones read as gone before the write as well
        before = {key: got for key, got in before.items() if key not in change}
    return keys, before, after


def follow_up(store, state):
    """A delete of something the write touched, and a set: both must last."""
    state = dict(state)
    gone = next(key for key in ("new", "k79", "k6", "k5", "k1", "k7", "k9") if key in state)
    store.delete(gone)
    del state[gone]
    store.set("k11", value(1111, 700))
    state["k11"] = value(1111, 700)
    return gone, state


@SLOW
@pytest.mark.parametrize("name", list(WRITES))
def test_a_write_cut_short_anywhere_leaves_it_done_or_not_done(tmp_path, monkeypatch,
                                                               templates, name):
    make, clock, write, change = WRITES[name]
    path = tmp_path / "store"
    keys, before, after = before_and_after(templates, make, clock, change, path)
    fresh(templates, make, path)
    with DataStore(path) as s:
        s._clock = lambda: clock
        points = points_of(monkeypatch, lambda: write(s))
    assert points > 5, points
    outcomes = set()
    for at in range(1, points + 1):
        for ending in ("close", "kill -9"):
            fresh(templates, make, path)
            s = DataStore(path)
            s._clock = lambda: clock
            interrupt(monkeypatch, at, lambda: write(s))
            if s._closed:  # close() itself was cut short: a new open finishes it
                s = DataStore(path)
                s._clock = lambda: clock
            state = content(s, keys)
            assert state in (before, after), (name, at)
            outcomes.add("after" if state == after else "before")
            s.check()
            gone, state = follow_up(s, state)
            if ending == "close":
                s.close()
            else:
                abandon(s)
            with DataStore(path) as s:
                s._clock = lambda: clock
                assert content(s, keys) == state, (name, at, ending)
                assert gone not in s
                s.check()
    print(f"{name}: {points} points, each with both endings")
    if change:
        assert outcomes == {"before", "after"}, outcomes


def held_descriptors(path):
    """This process's open descriptors of the store's .dat or .idx (Linux)."""
    names = {f"{path}.dat", f"{path}.idx"}
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") in names:
                held.append(fd)
        except OSError:  # closed meanwhile: listdir's own descriptor
            pass
    return held


@SLOW
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists descriptors in /proc")
@pytest.mark.parametrize("how", ["open-after-close", "open-after-kill", "reload"])
def test_an_open_cut_short_anywhere_leaves_nothing_open(tmp_path, monkeypatch, templates, how):
    """Opening (and reading the files again after a write was cut short)
    hands the engine to the store before any file is open: an interrupt at
    any point leaves no descriptor, and so no lock, behind."""
    path = tmp_path / "store"

    def prepare():
        fresh(templates, make_base, path)
        if how == "open-after-kill":
            abandon(DataStore(path))
        if how != "reload":
            return None
        s = DataStore(path)
        s._engine.busy = True  # as a write cut short leaves it
        return s

    def action(s):
        if how == "reload":
            s.keys()
        else:
            DataStore(path).close()
    s = prepare()
    points = points_of(monkeypatch, lambda: action(s))
    if s is not None:
        s.close()
    assert points > 20, points
    for at in range(1, points + 1):
        s = prepare()
        interrupt(monkeypatch, at, lambda: action(s))
        if s is not None:
            if not s._closed:
                assert sorted(s.keys()) == sorted(f"k{i}" for i in range(20) if i != 10)
            s.close()
        assert held_descriptors(path) == [], (how, at)
        with DataStore(path) as again:
            assert len(again) == 19, (how, at)
    print(f"{how}: {points} points")
