"""White-box tests of datastore.locks: the registry of the stores open in this
process (keyed by file identity, and its lock), the fork hooks, and the
finalizer. What a user sees of the locks (a second process refused, the
timeout, a forked child refused) is in test_datastore.py.
"""

import gc
import os
import signal
import threading
import time

import pytest

from datastore import DataStore, locks, opening
from tests.support import OPEN_IN_CHILD, POSIX_ONLY, run_python


def test_the_registry_holds_the_data_file_that_was_locked(path, monkeypatch):
    DataStore(path).close()
    stale = (0, 12345)  # as if path.dat was replaced while the opener waited
    monkeypatch.setattr(locks, "_file_identity", lambda name: [stale])
    with DataStore(path) as s:
        held = os.fstat(s._engine.dat)
        lock = os.stat(f"{path}.lock")
        assert s._identities == [(lock.st_dev, lock.st_ino), (held.st_dev, held.st_ino)]
        assert stale not in locks._open_stores
        assert locks._open_stores[held.st_dev, held.st_ino] is s
    assert not locks._open_stores


class InterruptAtSecondUse:
    """A lock whose second use raises KeyboardInterrupt (Ctrl-C there)."""

    def __init__(self):
        self.lock, self.uses = threading.Lock(), 0

    def __enter__(self):
        self.uses += 1
        if self.uses == 2:
            raise KeyboardInterrupt
        self.lock.acquire()

    def __exit__(self, *exc_info):
        self.lock.release()


@POSIX_ONLY
def test_an_interrupt_just_after_the_files_are_open_leaves_nothing_locked(path, monkeypatch):
    DataStore(path).close()
    monkeypatch.setattr(locks, "_open_stores_lock", InterruptAtSecondUse())
    with pytest.raises(KeyboardInterrupt):
        DataStore(path)  # the second use: just after the files are open and locked
    monkeypatch.undo()
    assert run_python(OPEN_IN_CHILD, path).stdout == "opened\n"
    assert not locks._open_stores
    DataStore(path).close()


FORK_WHILE_LOCKED = """
    import os, sys, threading, datastore
    from datastore import locks
    store = datastore.DataStore(sys.argv[1])
    store.create("k", {"v": 1})
    store._mutex.acquire()             # as a thread inside a call would hold it
    locks._open_stores_lock.acquire()  # and a thread opening another store
    pid = os.fork()
    if pid == 0:
        try:
            store.read("k")
            print("read", flush=True)
        except datastore.StoreForkedError:
            print("refused", flush=True)
        other = datastore.DataStore(sys.argv[1] + "-child")  # the registry still works
        other.create("c", {})
        sys.exit(0)                    # atexit and finalizers, which must not hang
    _, status = os.waitpid(pid, 0)
    print("child exited", status, flush=True)
    store._mutex.release()
    locks._open_stores_lock.release()
    store.close()
"""


@POSIX_ONLY
def test_fork_while_another_thread_holds_a_lock_does_not_hang_the_child(path):
    result = run_python(FORK_WHILE_LOCKED, path, timeout=60)
    assert result.stdout.split("\n")[:2] == ["refused", "child exited 0"], result.stderr


def test_the_finalizer_takes_no_lock_the_collecting_thread_may_hold(path):
    store = DataStore(path)
    store.create("k", {"v": 1})
    done = threading.Event()

    def collect_while_holding_the_registry_lock():
        with locks._open_stores_lock:
            nonlocal store
            del store
            gc.collect()
        done.set()

    thread = threading.Thread(target=collect_while_holding_the_registry_lock, daemon=True)
    thread.start()
    assert done.wait(timeout=10), "the finalizer deadlocked"
    with DataStore(path) as s:
        assert s.read("k") == {"v": 1}


@POSIX_ONLY
@pytest.mark.filterwarnings("ignore:.*multi-threaded, use of fork:DeprecationWarning")
def test_a_fork_while_another_thread_opens_a_store_leaves_no_lock_in_the_child(
        path, monkeypatch):
    DataStore(path).close()
    load = opening._load
    monkeypatch.setattr(opening, "_load", lambda engine: (time.sleep(0.5), load(engine)))
    opened = {}
    opener = threading.Thread(target=lambda: opened.setdefault("store", DataStore(path)))
    opener.start()
    time.sleep(0.2)  # the opener holds the data file, and its flock, by now
    pid = os.fork()
    if pid == 0:  # a child that lives on without using any store
        time.sleep(5)
        os._exit(0)
    try:
        opener.join(timeout=30)
        monkeypatch.undo()
        opened["store"].close()
        DataStore(path).close()  # the child holds no copy of the lock
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_the_fork_hook_marks_every_store_even_if_closing_one_fails(tmp_path, monkeypatch):
    """A fork can come while a view of a store's index map is alive (another
    thread inside a call): closing that store's copy then fails in the child.
    Every store must still be marked forked, and the others closed."""
    from datastore.engine import _Engine
    engines = [_Engine(str(tmp_path / f"s{i}"), 1 << 20) for i in range(3)]
    closed = []

    def failing():
        raise BufferError("cannot close exported pointers exist")
    engines[0].close_files = failing
    for engine in engines[1:]:
        engine.close_files = lambda engine=engine: closed.append(engine)
    monkeypatch.setattr(locks, "_engines", set(engines))
    monkeypatch.setattr(locks, "_open_stores", {})
    monkeypatch.setattr(locks, "_open_stores_lock", locks._open_stores_lock)
    locks._after_fork_in_child()
    assert all(engine.forked for engine in engines)
    assert sorted(map(id, closed)) == sorted(map(id, engines[1:]))
