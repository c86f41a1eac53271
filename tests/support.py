"""Helper functions shared by test_datastore.py and tests/test_*.py.

Import them as ``from tests.support import ...``. conftest.py has imported
datastore before this module (in the form DATASTORE_FORM chose), so
``datastore`` here is the form under test; every child process started
through these helpers imports that same form. The fixtures (path, store,
clock, holder, fresh_default) are in conftest.py.

All but assert_files_match_memory use only datastore's public names and a
DataStore's own attributes, which are the same in both forms; that one is
for the white-box tests, and imports the package's modules.
"""

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from pathlib import Path

import pytest

import datastore
from datastore import MAX_VALUE_BYTES, KeyNotFoundError, StoreFullError

ROOT = Path(__file__).resolve().parent.parent  # the repository
POSIX_ONLY = pytest.mark.skipif(os.name != "posix", reason="needs fork and signals")
SLOW = pytest.mark.slow  # over a few seconds: python -m pytest -m "not slow" skips them

# The form this session imported (conftest.py chose it and checked the file):
# the package src/datastore, or the generated copy-in file datastore.py.
FORM = "package" if Path(datastore.__file__).name == "__init__.py" else "file"
# The folder that holds it: a child process gets it as PYTHONPATH, and runs in
# it, since `python -c` and `python -m` put the working directory first on
# sys.path (run in the repository, they would import the copy-in datastore.py).
SOURCE = Path(datastore.__file__).resolve().parent.parent if FORM == "package" else ROOT
CHILD_CWD = SOURCE


def child_env(**extra):
    """An environment in which a child process imports the form under test."""
    return dict(os.environ, PYTHONPATH=str(SOURCE), **extra)


def cli_command(module=False):
    """The command line of the form under test: ``python datastore.py`` (or,
    with module=True, ``python -m datastore``) for the copy-in file, and
    ``python -m datastore`` for the package. Run it in CHILD_CWD with
    child_env()."""
    if FORM == "file" and not module:
        return [sys.executable, str(ROOT / "datastore.py")]
    return [sys.executable, "-m", "datastore"]


# --- Time, files and processes --------------------------------------------

class Clock:
    """A clock the test moves by hand; starts at the real time."""

    def __init__(self):
        self.now = time.time()

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def snapshot(folder):
    """Name -> SHA-256 of every file in folder: to prove nothing changed.

    Lock files are only listed, never opened: closing any descriptor of a
    lock file drops this process's POSIX lock on it.
    """
    return {p.name: "lock" if p.suffix == ".lock" else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).iterdir()) if p.is_file()}


def files_size(path):
    """Total bytes of all of a store's files."""
    folder, name = Path(path).parent, Path(path).name
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.name.startswith(name + "."))


def python_command(code, *args):
    """The command line, and an environment that imports the form under test."""
    command = [sys.executable, "-c", textwrap.dedent(code), *map(str, args)]
    return command, child_env()


def run_python(code, *args, timeout=60):
    """Run code in a fresh interpreter; return the CompletedProcess. On a
    timeout, kill its whole process group: children it forked too."""
    command, env = python_command(code, *args)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=CHILD_CWD,
                            start_new_session=os.name == "posix")
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL) if os.name == "posix" else proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def spawn_python(code, *args):
    """Start code in a fresh interpreter, with pipes to talk to it."""
    command, env = python_command(code, *args)
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=CHILD_CWD)


def expect_line(proc, expected, timeout=60):
    """Read one line from proc; on a mismatch kill it and fail with its stderr."""
    watchdog = threading.Timer(timeout, proc.kill)  # a hung child cannot hang us
    watchdog.start()
    try:
        line = proc.stdout.readline().strip()
    finally:
        watchdog.cancel()
    if line != expected:
        proc.kill()
        pytest.fail(f"expected {expected!r}, got {line!r}; stderr: {proc.stderr.read()}")


# A process that holds a store open until told to close it (the holder fixture).
HOLDER = """
    import sys, datastore
    store = datastore.DataStore(sys.argv[1])
    store.create("held", {"by": "holder"})
    print("ready", flush=True)
    sys.stdin.readline()       # wait until told to close
    store.close()
    print("closed", flush=True)
"""

# A process that tries to open the store sys.argv[1] and says what came of it.
OPEN_IN_CHILD = """
    import sys, datastore
    try:
        datastore.DataStore(sys.argv[1]).close()
        print("opened")
    except datastore.StoreLockedError as exc:
        print("locked:", exc)
"""


def run_threads(target, count, errors=None):
    """Run target(i) in `count` threads; an exception in one goes into
    `errors` (pytest would only warn of it), or fails the test at once."""
    caught = [] if errors is None else errors

    def guarded(i):
        try:
            target(i)
        except BaseException as exc:  # reported with the thread's number
            caught.append((i, repr(exc)))

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors is None:
        assert caught == []


# --- Stores -----------------------------------------------------------------

def abandon(store):
    """Leave a store as a killed process would: files closed, nothing written
    at close, the lock released."""
    store._finalizer.detach()
    store._engine.close_files()
    store._engine = None
    store._lock.release()
    store._unregister()


def counted_size(store):
    """What the store counts against max_bytes: its files, plus the room it
    keeps for what close() appends to .idx."""
    return store._engine.used()


def fill(store, prefix, size=400, ttl=None, check_cap=True):
    """Create keys until StoreFullError; return how many fitted."""
    count = 0
    while True:
        try:
            store.create(f"{prefix}{count:05d}", {"pad": "x" * size}, ttl=ttl)
        except StoreFullError:
            with pytest.raises(KeyNotFoundError):  # a refused create left nothing
                store.read(f"{prefix}{count:05d}")
            return count
        count += 1
        if check_cap:
            assert files_size(store.path) <= counted_size(store) <= store.max_bytes


def live_content(store):
    """Every live key of a store and its value."""
    content = {}
    for key in store.keys():
        try:
            content[key] = store.read(key)
        except KeyNotFoundError:  # expired
            pass
    return content


def make_store(path, count=20):
    """A closed store of keys k0, k1, ... holding {"i": 0}, {"i": 1}, ..."""
    with datastore.DataStore(path) as s:
        for i in range(count):
            s.create(f"k{i}", {"i": i})


# --- Records on disk, read by the documented format ------------------------
#
# The format module's docstring (and the copy-in file's) describes a record:
# a 32-byte head "<4sBBHQQII" (magic "\xffDSr", kind, key length, zero, sequence
# number, expires_at bits, length, CRC-32 of the head before it, the key and
# the body), then the key, then the body. These helpers read it from that
# description alone, so the user-level tests need no private name; a
# white-box test (tests/test_format.py) holds them to _parse_item's answers.

HEAD = struct.Struct("<4sBBHQQII")
BLOCK = 64  # records start at multiples of this many bytes of .dat
_LAST_EXPIRY_BITS = struct.unpack("<Q", struct.pack("<d", 253402300799.0))[0]  # 9999-12-31


def value_record(data, off=0):
    """(seq, key, expires_at bits, body) of the valid value record (kind 1)
    that starts at data[off:], or None."""
    if len(data) - off < HEAD.size:
        return None
    magic, kind, key_len, zero, seq, exp, length, crc = HEAD.unpack_from(data, off)
    if (magic != b"\xffDSr" or kind != 1 or zero or not 0 < key_len <= 4 * 32
            or length > MAX_VALUE_BYTES or exp > _LAST_EXPIRY_BITS or seq >= 1 << 62):
        return None
    key_at = off + HEAD.size
    end = key_at + key_len + length
    if end > len(data) or zlib.crc32(data[key_at:end], zlib.crc32(data[off:key_at - 4])) != crc:
        return None
    return seq, bytes(data[key_at:key_at + key_len]), exp, bytes(data[key_at + key_len:end])


def value_records(data):
    """Block -> key of every valid value record at a block boundary of a .dat."""
    records = {}
    for block in range(1, -(-len(data) // BLOCK)):
        item = value_record(data, block * BLOCK)
        if item is not None:
            records[block] = item[1]
    return records


def record_body(record):
    """The JSON value of a whole record: head, key, body."""
    item = value_record(record)
    assert item is not None and HEAD.size + len(item[1]) + len(item[3]) == len(record)
    return json.loads(item[3])


# --- White-box ---------------------------------------------------------------

def indexed(engine):
    """(key, slot) of every indexed record, expired or not."""
    from datastore.recovery import _indexed_heads

    keys, exps, places = _indexed_heads(engine)
    return [(key, place | exp << 48) for key, exp, place in zip(keys, exps, places)]


def assert_files_match_memory(store, trimmed=True):
    """What is on disk is what the engine believes: each indexed key has one
    valid record, the one the index names; no free extent holds a record;
    the expiries are those of the records; the files fit in what is counted; and
    (unless a truncate just failed) no free extent is left at the end.

    White-box (the package form only): it checks with the package's own
    _parse_item and slot functions.
    """
    from datastore import format as fmt

    engine = store._engine
    data = Path(engine.dat_path).read_bytes()
    assert len(data) == engine.dat_size
    on_disk = {}
    for block in range(1, fmt._blocks(len(data))):
        item = fmt._parse_item(data, block * fmt._BLOCK)
        if item is not None and item[0] == fmt._VALUE:
            on_disk[block] = item[2]
    items = indexed(engine)
    assert len(items) == engine.index.count
    assert on_disk == {fmt._slot_block(slot): key  # (stale: known, to go)
                       for key, slot in items + engine.stale}
    assert sorted(zip(*engine.expiries.dump())) == sorted(
        (fmt._slot_exp(slot), slot & fmt._SLOT_MASK) for _, slot in items if fmt._slot_exp(slot))
    extents = engine.free.extents()
    for start, length in extents:
        assert not any(start <= block < start + length for block in on_disk)
    assert engine.free.blocks == sum(length for _, length in extents)
    assert not trimmed or engine.free.start_before(fmt._blocks(len(data))) is None
    assert files_size(store.path) <= counted_size(store) <= store.max_bytes
    # The room the engine may still take without adding up what it uses
    # (see engine._put_record) is never more than what is left
    assert engine.credit <= store.max_bytes - counted_size(store)
