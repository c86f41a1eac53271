"""Keeping a store to one process: two locks, a registry, fork and exit.

A store holds two locks from open to close, and the operating system drops
both when the process dies, even by ``kill -9``:

* ``fasteners``' ``InterProcessLock`` on ``path.lock``: a POSIX record lock
  (``msvcrt.locking`` on Windows). It belongs to the process, so the process
  could take it twice, and closing *any* descriptor of the file drops it;
  deleting the file lets a second process in. ``timeout`` waits on it.
* An ``flock`` on ``path.dat``, through the descriptor the engine holds for
  the store's life (``_lock_data_file``). It belongs to that open file, so
  deleting ``path.lock`` does not defeat it; a child made by ``fork()``
  shares it with the parent.

Against the traps of each: a registry of the stores open in this process,
keyed by the identity (device, inode) of their lock file and data file,
refuses a second open under any spelling of the path, so no second
descriptor of the lock file is ever opened; identities are read with
``stat``, never by opening a file. A forked child closes its copies of every
store's descriptors at once, without unlocking. A store that is garbage
collected, or still open at exit, is closed by ``_finalize``.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any, Optional

from .errors import CorruptStoreError, _Locked

if sys.platform != "win32":
    import fcntl  # flock; on Windows only fasteners' lock on path.lock applies

if TYPE_CHECKING:
    from .engine import _Engine
    from .store import DataStore


def _lock_data_file(fd: int, path: str, deadline: Optional[float]) -> None:
    """flock .dat's descriptor `fd`, waiting until `deadline` at most, then
    check that the file at `path` is the one locked (it may have been
    replaced while we waited). Raises _Locked if either fails."""
    if sys.platform == "win32":
        return  # fasteners' lock on path.lock is the only one there
    delay = 0.005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if deadline is not None and time.monotonic() >= deadline:
                raise _Locked() from None
            time.sleep(delay)
            delay = min(2 * delay, 0.1)
    held, there = os.fstat(fd), os.stat(path)
    if (held.st_dev, held.st_ino) != (there.st_dev, there.st_ino):
        raise _Locked()  # replaced while we waited: another opener's now


# What we rely on in fasteners (0.18 to 0.20), in one place. InterProcessLock
# opens path.lock when acquiring and keeps it open; acquire(blocking,
# timeout=) returns False when it gives up; release() unlocks, sets
# `acquired` False, then closes the file (its `lockfile` attribute, None once
# closed). After a failed acquire the file stays open; we close it ourselves
# rather than leave it to the garbage collector. Closing it drops no lock of
# ours: this process holds none on that file (the registry below makes sure
# of it).

def _close_unlocked(lock: Any) -> None:
    if lock.lockfile is not None:
        lock.lockfile.close()
        lock.lockfile = None


def _release(lock: Any) -> None:
    """Release fasteners' lock; if a release was cut short part-way, finish it."""
    if lock.acquired:
        lock.release()
    else:
        _close_unlocked(lock)


def _file_identity(path: str) -> list[tuple[int, int]]:
    """[(st_dev, st_ino)] of a file, by os.stat, or [] if there is none."""
    try:
        info = os.stat(path)
    except OSError:  # missing, or unreadable: opening it will say which
        return []
    return [(info.st_dev, info.st_ino)]


def _lock_file_identity(lock_path: str) -> tuple[int, int]:
    """(st_dev, st_ino) of a store's lock file, created if missing.

    Taken with os.stat, never by opening the file: closing a descriptor of it
    would drop a lock this process holds on it through another DataStore.
    """
    try:
        info = os.stat(lock_path)
    except FileNotFoundError:  # nobody in this process can hold a lock on it
        os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600))
        info = os.stat(lock_path)
    if not stat.S_ISREG(info.st_mode):
        raise CorruptStoreError(f"{lock_path} is not a regular file; move it away",
                                path=lock_path)
    return info.st_dev, info.st_ino


# Stores open in this process, by the identity of their lock file and data
# file: a second spelling of the same files (a symbolic link, a bind mount,
# another letter case on macOS) is refused. Held weakly: a store that is
# garbage collected leaves, after its finalizer closed it.
_open_stores: weakref.WeakValueDictionary[tuple[int, int], DataStore] = (
    weakref.WeakValueDictionary())
_open_stores_lock = threading.Lock()
# Every engine with files open (or opening) in this process, for the fork hook.
_engines: weakref.WeakSet[_Engine] = weakref.WeakSet()


def _reserve(store: DataStore, lock_path: str, dat_path: str
             ) -> tuple[list[tuple[int, int]], Optional[DataStore]]:
    """Register `store` under the identities of its lock file and data file,
    while it waits for their locks, unless another store has either here:
    then that one is returned too, and nothing registered. (If the lock file
    was deleted and made anew, the data file still says the store is open.)"""
    with _open_stores_lock:
        identities = [_lock_file_identity(lock_path)] + _file_identity(dat_path)
        for identity in identities:
            holder = _open_stores.get(identity)
            if holder is not None:
                return identities, holder
        for identity in identities:
            _open_stores[identity] = store
        return identities, None


def _hold_data_file(store: DataStore, identities: list[tuple[int, int]], dat_fd: int) -> None:
    """Once locked, key `store` by the data file it locked (new, or replaced
    while it waited), not the one stat saw before."""
    info = os.fstat(dat_fd)
    with _open_stores_lock:
        for identity in identities[1:]:
            _open_stores.pop(identity, None)
        identities[1:] = [(info.st_dev, info.st_ino)]
        _open_stores[info.st_dev, info.st_ino] = store


def _unreserve(store: DataStore, identities: list[tuple[int, int]]) -> None:
    with _open_stores_lock:
        for identity in identities:
            if _open_stores.get(identity) is store:
                del _open_stores[identity]


def _after_fork_in_child() -> None:
    """In a child made by fork(): let go of the parent's stores and start the
    registry's lock afresh (another thread may have held it at the fork).

    The child closes its copies of each store's descriptors and never
    unlocks: an flock is shared with the parent, which still holds it.
    """
    global _open_stores_lock
    _open_stores_lock = threading.Lock()
    engines = list(_engines)  # stores being opened too
    for engine in engines:  # all of them first: closing one might fail
        engine.forked = True
    for engine in engines:
        try:
            engine.close_files()
        except Exception:  # (the child has no use for the parent's files anyway)
            pass
    _open_stores.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _finalize(mutex: threading.Lock, engine: _Engine, lock: Any, pid: int) -> None:
    """Close a store that was garbage collected, or still open at exit.

    It runs in whatever thread triggers the collection, so it takes no lock
    that thread could hold: the registry drops the store by itself, and the
    store's own mutex is free (any thread inside a call would hold a
    reference). At exit, a daemon thread may still be inside a call: then it
    leaves the files to the next open's recovery rather than wait.
    """
    if os.getpid() != pid:
        engine.close_files()  # a forked child: the files and locks are the parent's
        return
    if not mutex.acquire(timeout=1.0):
        return
    try:
        engine.close(time.time())
    except OSError:
        pass  # not closed cleanly: the next open scans the data file
    finally:
        mutex.release()
        _release(lock)
