"""The user-level contract of datastore, one section per requirement.

These tests use only datastore's public interface and what a user can
observe: the files on disk (read by their documented format), real
subprocesses, a real SIGKILL, real threads, the command line, and the
README's and the module docstring's examples. They pass against both forms
of the module (see conftest.py): the package src/datastore (the default) and
the generated copy-in file datastore.py (DATASTORE_FORM=file), so they never
touch a module-level private name, which the two forms keep in different
places. A few reach into a DataStore's own attributes (store._clock,
store._engine, abandon()), which are the same in both. White-box tests of the
package's modules are in tests/. Every store lives under pytest's tmp_path.
"""

import dbm.dumb
import doctest
import errno
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from datetime import datetime, timezone
from pathlib import Path

import pytest

import datastore
from datastore import (
    MAX_KEY_LENGTH, MAX_STORE_BYTES, MAX_VALUE_BYTES, MIN_STORE_BYTES,
    CorruptStoreError, DataStore, DataStoreError, DataStoreTypeError,
    DataStoreValueError, InvalidKeyError, InvalidTTLError, InvalidValueError,
    KeyExistsError, KeyNotFoundError, KeyTypeError, StoreClosedError,
    StoreForkedError, StoreFullError, StoreLockedError, TTLTypeError,
    ValueTypeError,
)
from tests.support import (
    BLOCK, CHILD_CWD, OPEN_IN_CHILD, POSIX_ONLY, ROOT, SLOW, abandon, child_env,
    cli_command, counted_size, expect_line, files_size, fill, live_content, make_store,
    run_python, run_threads, snapshot, spawn_python, value_records,
)


# --- The public interface -------------------------------------------------

def test_constants_have_the_documented_values():
    assert (MAX_KEY_LENGTH, MAX_VALUE_BYTES, MAX_STORE_BYTES) == (32, 16384, 1024 ** 3)


def test_create_then_read_returns_an_equal_value(store):
    value = {"name": "Ada", "born": 1815, "langs": ["en", "fr"], "ok": True,
             "none": None, "pi": 3.14159, "nested": {"a": {"b": []}}}
    store.create("ada", value)
    assert store.read("ada") == value


def test_store_path_is_resolved_and_files_sit_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with DataStore(Path("sub") / "dir" / "s") as s:  # missing folders are created
        assert s.path == (tmp_path / "sub" / "dir" / "s").resolve()
        assert s.path.is_absolute()
    names = sorted(p.name for p in (tmp_path / "sub" / "dir").iterdir())
    assert names == ["s.dat", "s.idx", "s.lock"]


def test_data_survives_close_and_reopen(path):
    with DataStore(path) as s:
        s.create("k", {"v": 1})
        s.create("gone", {"v": 2})
        s.delete("gone")
    with DataStore(path) as s:
        assert s.read("k") == {"v": 1}
        with pytest.raises(KeyNotFoundError):
            s.read("gone")


def test_a_reopened_store_holds_exactly_the_live_keys_in_three_files(path, clock):
    with DataStore(path) as s:
        s._clock = clock
        s.create("a", {"v": 1})
        s.create("b", {"v": 2})
        s.delete("b")
        s.create("c", {"v": 3}, ttl=60)
        s.create("gone", {"v": 4}, ttl=1)
        clock.advance(2)
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.dat", "store.idx",
                                                              "store.lock"]
    with DataStore(path) as s:
        s._clock = clock
        assert live_content(s) == {"a": {"v": 1}, "c": {"v": 3}}


def test_context_manager_closes_the_store(path):
    with DataStore(path) as s:
        s.create("k", {})
    with pytest.raises(StoreClosedError):
        s.read("k")


def test_repr_names_path_and_state(path):
    s = DataStore(path)
    assert repr(s) == f"<DataStore {str(s.path)!r} open>"
    s.close()
    assert repr(s) == f"<DataStore {str(s.path)!r} closed>"


# --- Keys -----------------------------------------------------------------

@pytest.mark.parametrize("key", [
    pytest.param("a", id="one-char"), pytest.param("x" * 32, id="32-chars"),
    pytest.param("line\nbreak", id="newline"), pytest.param("nul\x00byte", id="nul"),
    pytest.param("tab\tand 'quotes\"", id="tab-and-quotes"), pytest.param("ключ", id="cyrillic"),
    pytest.param("鍵", id="cjk"), pytest.param("🔑" * 32, id="32-emoji"),
    pytest.param("\\", id="backslash"), pytest.param("é" * 32, id="32-accented"),
    pytest.param("\U0010ffff", id="last-code-point"),
])
def test_any_key_of_1_to_32_characters_round_trips(path, key):
    with DataStore(path) as s:
        s.create(key, {"key": key})
        assert s.read(key) == {"key": key}
    with DataStore(path) as s:  # also through the index written at close
        assert s.read(key) == {"key": key}
        s.delete(key)
        with pytest.raises(KeyNotFoundError):
            s.read(key)


BAD_KEYS = [
    pytest.param(None, KeyTypeError, id="none"), pytest.param(1, KeyTypeError, id="int"),
    pytest.param(b"bytes", KeyTypeError, id="bytes"),
    pytest.param(["k"], KeyTypeError, id="list"), pytest.param("", InvalidKeyError, id="empty"),
    pytest.param("x" * 33, InvalidKeyError, id="33-chars"),
    pytest.param("🔑" * 33, InvalidKeyError, id="33-emoji"),
    pytest.param("lone \ud800 surrogate", InvalidKeyError, id="surrogate"),
]


@pytest.mark.parametrize("key, error", BAD_KEYS)
@pytest.mark.parametrize("op", ["create", "read", "delete"])
def test_bad_keys_are_refused_and_nothing_changes(store, key, error, op):
    store.create("present", {"v": 1})
    before = snapshot(store.path.parent)
    args = (key, {"v": 1}) if op == "create" else (key,)
    with pytest.raises(error) as info:
        getattr(store, op)(*args)
    base = TypeError if error is KeyTypeError else ValueError
    assert isinstance(info.value, base) and isinstance(info.value, DataStoreError)
    assert "key" in str(info.value)
    assert snapshot(store.path.parent) == before
    assert store.read("present") == {"v": 1}


def test_key_length_error_names_limit_and_actual_length(store):
    with pytest.raises(InvalidKeyError, match=r"1 to 32 characters, got 33"):
        store.create("x" * 33, {})


# --- Values ---------------------------------------------------------------

def json_size(value):
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def value_of_size(size, char="x"):
    """A dict whose compact UTF-8 JSON is exactly `size` bytes."""
    room = size - json_size({"v": ""})
    width = len(char.encode())
    value = {"v": char * (room // width) + "x" * (room % width)}
    assert json_size(value) == size
    return value


def test_value_of_exactly_16384_bytes_is_accepted(store):
    value = value_of_size(MAX_VALUE_BYTES)
    store.create("big", value)
    assert store.read("big") == value


@pytest.mark.parametrize("char", [pytest.param("x", id="ascii"), pytest.param("é", id="two-bytes")])
def test_value_of_16385_bytes_is_refused_with_sizes_in_message(store, char):
    value = value_of_size(MAX_VALUE_BYTES + 1, char)
    before = snapshot(store.path.parent)
    with pytest.raises(InvalidValueError, match="16385 bytes .* limit is 16384"):
        store.create("big", value)
    assert snapshot(store.path.parent) == before


def circular():
    value = {}
    value["self"] = value
    return value


def deeply_nested():
    value = {}
    for _ in range(100_000):
        value = {"a": value}
    return value


BAD_VALUES = [
    pytest.param(None, ValueTypeError, id="none"),
    pytest.param([1, 2], ValueTypeError, id="list"),
    pytest.param('{"a": 1}', ValueTypeError, id="json-text"),
    pytest.param(42, ValueTypeError, id="int"),
    pytest.param({"n": float("nan")}, InvalidValueError, id="nan"),
    pytest.param({"n": float("inf")}, InvalidValueError, id="inf"),
    pytest.param({"n": -float("inf")}, InvalidValueError, id="minus-inf"),
    pytest.param({"s": {1, 2}}, InvalidValueError, id="set"),
    pytest.param({"b": b"bytes"}, InvalidValueError, id="bytes"),
    pytest.param({"o": object()}, InvalidValueError, id="object"),
    pytest.param(circular(), InvalidValueError, id="circular"),
    pytest.param(deeply_nested(), InvalidValueError, id="nested-100000"),
    pytest.param({"t": (1, 2)}, InvalidValueError, id="tuple"),
    pytest.param({1: "int key"}, InvalidValueError, id="int-key"),
    pytest.param({"s": "lone \udc80"}, InvalidValueError, id="surrogate"),
    pytest.param({(1, 2): "tuple key"}, InvalidValueError, id="tuple-key"),
]


@pytest.mark.parametrize("value, error", BAD_VALUES)
def test_bad_values_are_refused_and_nothing_changes(store, value, error):
    before = snapshot(store.path.parent)
    with pytest.raises(error) as info:
        store.create("k", value)
    base = TypeError if error is ValueTypeError else ValueError
    assert isinstance(info.value, base) and isinstance(info.value, DataStoreError)
    assert "'k'" in str(info.value)
    assert snapshot(store.path.parent) == before
    with pytest.raises(KeyNotFoundError):
        store.read("k")


class LyingKey(str):
    """A str that lies about its length, its encoding and equality."""

    def __len__(self):
        return 5

    def encode(self, *args, **kwargs):
        return b"short"

    def __eq__(self, other):
        return True

    __hash__ = str.__hash__


class LyingDict(dict):
    """A dict that lies about its items, its length and equality."""

    def items(self):
        return [("fake", 1)]

    def __len__(self):
        return 0

    def __eq__(self, other):
        return True

    __hash__ = None


def test_subclasses_are_checked_and_stored_by_what_they_hold(store):
    with pytest.raises(InvalidKeyError, match="got 40"):
        store.create(LyingKey("x" * 40), {})
    store.create(LyingKey("fine"), LyingDict(real=[1, {"n": LyingKey("deep")}]))
    assert store.read("fine") == {"real": [1, {"n": "deep"}]}
    assert store.keys() == ["fine"] and type(store.keys()[0]) is str
    with pytest.raises(InvalidValueError, match="tuple"):
        store.create("t", LyingDict(t=(1, 2)))  # a lying __eq__ does not pass it
    with pytest.raises(InvalidValueError, match="not a str"):
        store.create("n", LyingDict({1: "int key"}))
    store.create("enum", {"level": signal.SIGTERM, "ok": True, "f": 1.5})  # an IntEnum
    assert store.read("enum") == {"level": int(signal.SIGTERM), "ok": True, "f": 1.5}
    assert type(store.read("enum")["level"]) is int


def nested(depth):
    value = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_values_nest_at_most_max_value_depth_levels_and_read_back_deep_in_a_stack(store):
    assert datastore.MAX_VALUE_DEPTH == 100
    store.create("deepest", nested(100))
    for depth in (101, 950):
        with pytest.raises(InvalidValueError, match="nested more than 100 levels"):
            store.create("deeper", nested(depth))

    def read_at(frames):
        return read_at(frames - 1) if frames else store.read("deepest")

    limit = sys.getrecursionlimit()
    assert read_at(limit - 150) == nested(100)  # a read called from deep in a stack


def test_stored_value_is_a_copy_both_ways(store):
    value = {"list": [1, 2], "inner": {"a": 1}}
    store.create("k", value)
    value["list"].append(3)
    value["inner"]["a"] = 99
    first = store.read("k")
    assert first == {"list": [1, 2], "inner": {"a": 1}}
    first["list"].clear()
    assert store.read("k") == {"list": [1, 2], "inner": {"a": 1}}
    assert store.read("k") is not store.read("k")


def test_empty_dict_and_unicode_values_round_trip(store):
    store.create("empty", {})
    store.create("text", {"ключ": "значение", "emoji": "🙂", "nul": "\x00"})
    assert store.read("empty") == {}
    assert store.read("text") == {"ключ": "значение", "emoji": "🙂", "nul": "\x00"}


def test_an_int_too_long_for_json_is_an_invalid_value(tmp_path):
    with DataStore(tmp_path / "store") as s:
        with pytest.raises(InvalidValueError, match="cannot be written as JSON"):
            s.create("k", {"a": 10 ** 5000})
        assert "k" not in s
        s.create("k", {"a": 10 ** 100})
        assert s.read("k") == {"a": 10 ** 100}


class IntPath:
    def __fspath__(self):
        return 5


@pytest.mark.parametrize("path", [pytest.param(IntPath(), id="fspath-gives-int"),
                                  pytest.param(b"store", id="bytes")])
def test_a_path_that_gives_no_str_is_a_type_error(path):
    with pytest.raises(DataStoreTypeError, match="path must be a str or an os.PathLike"):
        DataStore(path)


# --- Create, read, delete -------------------------------------------------

def test_create_on_a_live_key_raises_and_keeps_the_old_value(store):
    store.create("k", {"v": "old"})
    before = snapshot(store.path.parent)
    with pytest.raises(KeyExistsError, match="'k' already exists"):
        store.create("k", {"v": "new"})
    assert store.read("k") == {"v": "old"}
    assert snapshot(store.path.parent) == before


@pytest.mark.parametrize("op", ["read", "delete"])
def test_missing_key_raises_key_not_found_which_is_a_key_error(store, op):
    before = snapshot(store.path.parent)
    with pytest.raises(KeyError) as info:
        getattr(store, op)("nope")
    assert isinstance(info.value, KeyNotFoundError)
    assert str(info.value) == "key 'nope' not found"
    assert info.value.key == "nope"
    assert snapshot(store.path.parent) == before


def test_delete_then_key_is_gone_and_can_be_created_again(store):
    store.create("k", {"v": 1})
    store.delete("k")
    with pytest.raises(KeyNotFoundError):
        store.read("k")
    with pytest.raises(KeyNotFoundError):
        store.delete("k")
    store.create("k", {"v": 2, "bigger": "x" * 3000})  # too big for the old slot
    assert store.read("k") == {"v": 2, "bigger": "x" * 3000}
    store.delete("k")
    store.create("k", {"v": 3})  # fits the slot: rewritten in place
    assert store.read("k") == {"v": 3}


def test_recreated_keys_survive_reopen_with_the_newest_value(path):
    with DataStore(path) as s:
        for i in range(5):
            s.create("k", {"v": i, "pad": "x" * (i * 700)})
            s.delete("k")
        s.create("k", {"v": "last"})
    with DataStore(path) as s:
        assert s.read("k") == {"v": "last"}


# --- set, get, in, len, keys and ttl ---------------------------------------

def test_set_stores_whether_or_not_the_key_is_live(store, clock):
    store._clock = clock
    store.set("k", {"v": 1})                 # a new key
    store.set("k", {"v": 2, "pad": "x" * 3000}, ttl=10)  # over a live one, larger
    assert store.read("k") == {"v": 2, "pad": "x" * 3000} and store.ttl("k") == 10
    store.set("k", {"v": 3})                 # smaller, and no ttl any more
    assert store.read("k") == {"v": 3} and store.ttl("k") is None
    with pytest.raises(KeyExistsError):      # create still refuses a live key
        store.create("k", {"v": 4})
    store.set("t", {"v": 1}, ttl=1)
    clock.advance(1)
    store.set("t", {"v": 2})                 # over an expired one
    assert store.read("t") == {"v": 2} and len(store) == 2


def test_set_refuses_bad_arguments_and_changes_nothing(store):
    store.set("k", {"v": 1})
    for args, error in [(("", {}), InvalidKeyError), (("k", []), ValueTypeError),
                        (("k", {"t": (1,)}), InvalidValueError), (("k", {}, 0), InvalidTTLError)]:
        with pytest.raises(error):
            store.set(*args)
    assert store.read("k") == {"v": 1}


def test_get_returns_the_default_for_a_missing_or_expired_key(store, clock):
    store._clock = clock
    store.create("k", {"v": 1})
    store.create("t", {"v": 2}, ttl=5)
    clock.advance(5)
    assert store.get("k") == {"v": 1}
    assert store.get("t") is None and store.get("nope", {"d": 0}) == {"d": 0}
    with pytest.raises(KeyTypeError):  # a bad key still raises
        store.get(1)


def test_in_is_true_for_live_keys_only_and_reads_no_value(store, clock, monkeypatch):
    store._clock = clock
    store.create("k", {"v": "x" * 100})
    store.create("t", {"v": "y" * 100}, ttl=5)
    store.create("gone", {})
    store.delete("gone")
    reads, real_pread = [], os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, at: reads.append(n) or real_pread(fd, n, at))
    assert "k" in store and "t" in store
    assert "gone" not in store and "never" not in store
    clock.advance(5)
    assert "t" not in store
    assert reads and max(reads) < 40  # a record's head (32 bytes) and key, no more
    with pytest.raises(InvalidKeyError):
        "" in store


def test_len_keys_and_iter_count_live_keys_exactly(path, clock):
    s = DataStore(path)
    s._clock = clock
    for i in range(300):
        s.create(f"k{i}", {"i": i}, ttl=10 if i % 3 == 0 else None)
    for i in range(0, 300, 5):
        s.delete(f"k{i}")
    live = {f"k{i}" for i in range(300) if i % 5}
    assert len(s) == len(live) and set(s.keys()) == live and set(s) == live
    clock.advance(10)  # the ttl keys expire, none reclaimed yet
    live = {key for key in live if int(key[1:]) % 3}
    assert len(s) == len(live) and set(s.keys()) == live
    s.create("new", {})  # reclaims a few expired keys
    live.add("new")
    assert len(s) == len(live) and sorted(s) == sorted(live)
    s.compact()
    assert len(s) == len(live) and set(s) == live
    abandon(s)  # recovery after a crash
    with DataStore(path) as s:
        s._clock = clock
        assert len(s) == len(live) and set(s) == live
    with DataStore(path) as s:  # the snapshot a clean close wrote
        s._clock = clock
        assert len(s) == len(live) and set(s) == live
        assert bool(s) is True
        for key in list(s):
            s.delete(key)
        assert len(s) == 0 and not s and list(s) == []  # empty: falsy, like a dict


def test_keys_is_a_snapshot_safe_while_other_threads_write(store):
    for i in range(500):
        store.create(f"k{i}", {})
    errors = []

    def writer(t):
        for i in range(500):
            store.set(f"w{t}-{i}", {})
            if t == 0:
                store.delete(f"k{i}")

    def reader(t):
        for _ in range(50):
            seen = [key for key in store]  # iterating while the writers change the store
            assert len(seen) == len(set(seen)) and 500 <= len(seen) <= 1500

    run_threads(lambda t: writer(t) if t < 2 else reader(t), 4, errors)
    assert errors == []
    assert sorted(store.keys()) == sorted(f"w{t}-{i}" for t in range(2) for i in range(500))


def test_ttl_gives_seconds_left_or_none(store, clock):
    store._clock = clock
    store.create("t", {}, ttl=100)
    store.create("forever", {})
    clock.advance(40.5)
    assert store.ttl("t") == pytest.approx(59.5) and store.ttl("forever") is None
    clock.advance(59.5)
    for key in ("t", "never"):
        with pytest.raises(KeyNotFoundError, match=f"'{key}' not found"):
            store.ttl(key)


def test_set_on_a_full_store_replaces_values_no_larger(path):
    with DataStore(path, max_bytes=MIN_STORE_BYTES) as s:
        count = fill(s, "k", size=700)
        for round in range(3):
            for i in range(count):
                s.set(f"k{i:05d}", {"pad": "y" * (700 - round * 100)})
                assert counted_size(s) <= s.max_bytes
        assert all(s.read(f"k{i:05d}") == {"pad": "y" * 500} for i in range(count))


def test_a_set_that_grows_a_value_keeps_the_room_so_same_size_sets_still_work(path):
    with DataStore(path, max_bytes=MIN_STORE_BYTES) as s:
        count = fill(s, "k", size=100)  # one block each
        s.delete(f"k{count - 1:05d}")
        count -= 1
        before = snapshot(path.parent)
        with pytest.raises(StoreFullError, match="needs .* more bytes"):
            s.set("k00001", {"pad": "y" * 700})  # two blocks: as a create would, refused
        assert snapshot(path.parent) == before and s.read("k00001") == {"pad": "x" * 100}
        for round in range(2):
            for i in range(count):  # the room it kept serves these
                s.set(f"k{i:05d}", {"pad": "z" * 100})
        assert len(s) == count and s.read("k00001") == {"pad": "z" * 100}


def test_sixteen_threads_setting_one_key_all_succeed(store):
    barrier = threading.Barrier(16)
    errors = []

    def setter(i):
        barrier.wait()
        for n in range(50):
            store.set("shared", {"by": i, "n": n})

    run_threads(setter, 16, errors)
    assert errors == [] and store.read("shared")["n"] == 49


def test_module_functions_set_get_keys_and_ttl(tmp_path, monkeypatch, fresh_default):
    monkeypatch.setenv("DATASTORE_PATH", str(tmp_path / "elsewhere" / "store"))
    datastore.set("a", {"v": 1}, ttl=60)
    datastore.set("a", {"v": 2})
    assert datastore.get("a") == {"v": 2} and datastore.get("b", 0) == 0
    assert datastore.keys() == ["a"] and datastore.ttl("a") is None
    with pytest.raises(StoreLockedError, match="already open in this process"):
        DataStore(tmp_path / "elsewhere" / "store")  # the default store is open there


# --- Time to live ---------------------------------------------------------

def test_key_expires_at_create_time_plus_ttl(store, clock):
    store._clock = clock
    store.create("k", {"v": 1}, ttl=10)
    clock.advance(9.999)
    assert store.read("k") == {"v": 1}
    clock.advance(0.001)
    with pytest.raises(KeyNotFoundError):
        store.read("k")
    with pytest.raises(KeyNotFoundError):
        store.delete("k")
    store.create("k", {"v": 2})  # an expired key may be created again
    assert store.read("k") == {"v": 2}


def test_expired_key_is_not_written_by_read_or_delete(store, clock):
    store._clock = clock
    store.create("k", {"v": 1}, ttl=1)
    clock.advance(2)
    before = snapshot(store.path.parent)
    for op in (store.read, store.delete):
        with pytest.raises(KeyNotFoundError):
            op("k")
    assert snapshot(store.path.parent) == before


def test_expiry_is_wall_clock_and_survives_reopen(path, clock):
    with DataStore(path) as s:
        s.create("short", {"v": 1}, ttl=1)
        s.create("long", {"v": 2}, ttl=3600)
    time.sleep(1.1)
    with DataStore(path) as s:
        with pytest.raises(KeyNotFoundError):
            s.read("short")
        assert s.read("long") == {"v": 2}
        clock.now = time.time()  # now, and then an hour later
        s._clock = clock
        clock.advance(3600)
        with pytest.raises(KeyNotFoundError):
            s.read("long")


BAD_TTLS = [
    pytest.param(True, TTLTypeError, id="bool"), pytest.param(1.5, TTLTypeError, id="float"),
    pytest.param(1.0, TTLTypeError, id="whole-float"), pytest.param("10", TTLTypeError, id="str"),
    pytest.param(0, InvalidTTLError, id="zero"), pytest.param(-1, InvalidTTLError, id="negative"),
    pytest.param(10 ** 12, InvalidTTLError, id="past-9999"),
    pytest.param(10 ** 400, InvalidTTLError, id="huge"),
]


@pytest.mark.parametrize("ttl, error", BAD_TTLS)
def test_bad_ttls_are_refused_and_nothing_changes(store, ttl, error):
    before = snapshot(store.path.parent)
    with pytest.raises(error) as info:
        store.create("k", {"v": 1}, ttl=ttl)
    base = TypeError if error is TTLTypeError else ValueError
    assert isinstance(info.value, base) and isinstance(info.value, DataStoreError)
    assert "ttl" in str(info.value)
    assert snapshot(store.path.parent) == before


LAST_SECOND_OF_9999 = int(datetime(9999, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp())


def test_largest_ttl_reaches_the_year_9999(store):
    ttl = LAST_SECOND_OF_9999 - int(time.time()) - 10
    store.create("k", {"v": 1}, ttl=ttl)
    assert store.read("k") == {"v": 1}


# --- Closed store and exceptions ------------------------------------------

@pytest.mark.parametrize("call", [
    pytest.param(lambda s: s.create("k", {}), id="create"),
    pytest.param(lambda s: s.set("k", {}), id="set"),
    pytest.param(lambda s: s.read("k"), id="read"),
    pytest.param(lambda s: s.get("k"), id="get"),
    pytest.param(lambda s: s.delete("k"), id="delete"),
    pytest.param(lambda s: s.ttl("k"), id="ttl"),
    pytest.param(lambda s: "k" in s, id="in"), pytest.param(len, id="len"),
    pytest.param(lambda s: s.keys(), id="keys"), pytest.param(list, id="iter"),
    pytest.param(lambda s: s.sync(), id="sync"), pytest.param(lambda s: s.compact(), id="compact"),
    pytest.param(lambda s: s.check(), id="check"),
])
def test_every_operation_on_a_closed_store_raises(path, call):
    s = DataStore(path)
    s.create("k", {})
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreClosedError, match="is closed"):
        call(s)


def test_all_errors_share_one_root_and_pickle_with_their_attributes(store):
    errors = [cls for name, cls in vars(datastore).items() if not name.startswith("_")
              and isinstance(cls, type) and issubclass(cls, Exception)]
    assert {e.__name__ for e in errors} == {n for n in datastore.__all__ if n.endswith("Error")}
    assert all(issubclass(e, DataStoreError) for e in errors) and len(errors) == 16
    with pytest.raises(KeyNotFoundError) as info:
        store.read("nope")
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is KeyNotFoundError
    assert (str(copy), copy.key, copy.path) == (str(info.value), "nope", store.path)
    for cls in errors:
        again = pickle.loads(pickle.dumps(cls("message", key="k", path="p")))
        assert (type(again), str(again), again.key, again.path) == (cls, "message", "k", "p")


@pytest.mark.parametrize("kwargs, error", [
    pytest.param({"max_bytes": "big"}, DataStoreTypeError, id="str"),
    pytest.param({"max_bytes": True}, DataStoreTypeError, id="bool"),
    pytest.param({"max_bytes": MIN_STORE_BYTES - 1}, DataStoreValueError, id="too-small"),
    pytest.param({"max_bytes": 2 ** 41}, DataStoreValueError, id="too-large"),
])
def test_bad_max_bytes_is_refused(path, kwargs, error):
    with pytest.raises(error):
        DataStore(path, **kwargs)
    assert not path.parent.joinpath("store.dat").exists()


@pytest.mark.parametrize("bad, error, message", [
    pytest.param(42, DataStoreTypeError, "must be a str", id="int"),
    pytest.param(b"x", DataStoreTypeError, "must be a str", id="bytes"),
    pytest.param("", DataStoreValueError, "empty", id="empty"),
    pytest.param("nul\0byte", DataStoreValueError, "NUL", id="nul"),
    pytest.param("lone \ud800 surrogate", DataStoreValueError, "cannot be encoded", id="surrogate"),
    pytest.param("sub/.", DataStoreValueError, "names a folder", id="dot"),
    pytest.param("x/", DataStoreValueError, "names a folder", id="trailing-slash"),
])
def test_bad_path_is_refused(tmp_path, monkeypatch, bad, error, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error, match=message):
        DataStore(bad)
    assert list(tmp_path.iterdir()) == []


def test_a_path_naming_an_existing_folder_is_refused_naming_the_files(tmp_path):
    with pytest.raises(DataStoreValueError, match=r"is a folder.*\.dat, \.idx and \.lock"):
        DataStore(tmp_path)
    assert list(tmp_path.iterdir()) == []


# --- One process per store ------------------------------------------------

@POSIX_ONLY
def test_second_process_is_refused_at_once_with_the_path(path, holder):
    started = time.monotonic()
    result = run_python(OPEN_IN_CHILD, path)
    assert result.stdout.startswith("locked:"), result.stderr
    assert str(path) in result.stdout and "another process" in result.stdout
    assert time.monotonic() - started < 5  # no waiting for the lock
    with pytest.raises(StoreLockedError, match="another process"):
        DataStore(path)


@POSIX_ONLY
def test_next_opener_succeeds_after_the_holder_closes(path, holder):
    holder.stdin.write("close\n")
    holder.stdin.flush()
    expect_line(holder, "closed")
    with DataStore(path) as s:
        assert s.read("held") == {"by": "holder"}


@POSIX_ONLY
def test_next_opener_succeeds_after_the_holder_is_killed(path, holder):
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=10)
    with DataStore(path) as s:
        assert s.read("held") == {"by": "holder"}


@POSIX_ONLY
def test_second_open_in_the_same_process_is_refused_and_keeps_the_lock(path):
    first = DataStore(path)
    first.create("k", {"v": 1})
    with pytest.raises(StoreLockedError, match="already open in this process"):
        DataStore(path)
    # The refused open must not have dropped the first one's lock.
    assert run_python(OPEN_IN_CHILD, path).stdout.startswith("locked:")
    assert first.read("k") == {"v": 1}
    first.close()
    assert run_python(OPEN_IN_CHILD, path).stdout.strip() == "opened"


@POSIX_ONLY
def test_relative_and_symlinked_paths_are_the_same_store(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with DataStore(tmp_path / "real" / "s"):
        with pytest.raises(StoreLockedError):
            DataStore(tmp_path / "link" / "s")
        monkeypatch.chdir(tmp_path / "real")
        with pytest.raises(StoreLockedError):
            DataStore("s")


@POSIX_ONLY
def test_deleting_the_lock_file_does_not_let_a_second_process_in(path, holder):
    os.remove(f"{path}.lock")  # a cron job cleaning *.lock does this
    result = run_python(OPEN_IN_CHILD, path)
    assert result.stdout.startswith("locked:") and "another process" in result.stdout, (
        result.stdout + result.stderr)


TAKE_LOCK_FILE_IN_CHILD = """
    import sys, fasteners
    lock = fasteners.InterProcessLock(sys.argv[1] + ".lock")
    print("took it" if lock.acquire(blocking=False) else "held")
"""


@POSIX_ONLY
@pytest.mark.parametrize("where", ["except", "finally"])
def test_opening_while_an_exception_is_handled_keeps_both_locks(path, where):
    if where == "except":
        try:
            raise ValueError("the caller's own error")
        except ValueError:
            store = DataStore(path)
    else:  # a `finally` while the caller's exception propagates
        with pytest.raises(ValueError, match="the caller's own error"):
            try:
                raise ValueError("the caller's own error")
            finally:
                store = DataStore(path)
    assert run_python(TAKE_LOCK_FILE_IN_CHILD, path).stdout == "held\n"
    store.create("k", {"v": 1})
    store.close()  # releases the lock it holds, raising nothing
    assert run_python(TAKE_LOCK_FILE_IN_CHILD, path).stdout == "took it\n"
    with DataStore(path) as s:
        assert s.read("k") == {"v": 1}


@POSIX_ONLY
def test_a_lock_file_made_anew_does_not_hide_a_store_open_in_this_process(path):
    with DataStore(path) as s:
        os.remove(f"{path}.lock")  # then another opener makes a new one
        started = time.monotonic()
        with pytest.raises(StoreLockedError, match="already open in this process"):
            DataStore(path, timeout=None)  # not a wait on our own flock
        assert time.monotonic() - started < 1
        s.create("k", {"v": 1})
    with DataStore(path) as s:  # and closing unregistered it
        assert s.read("k") == {"v": 1}


@pytest.mark.parametrize("closed", [True, False], ids=["closed", "crashed"])
@pytest.mark.parametrize("larger", [4, 16])  # 16: an index too large to trust: a scan
def test_a_store_filled_under_a_larger_max_bytes_is_refused_unchanged(path, larger, closed):
    s = DataStore(path, max_bytes=larger * MIN_STORE_BYTES)
    count = fill(s, "k", check_cap=False)
    s.close() if closed else abandon(s)
    before = snapshot(path.parent)
    with pytest.raises(StoreFullError, match=r"more than max_bytes=65536 .* larger max_bytes"):
        DataStore(path, max_bytes=MIN_STORE_BYTES)
    assert snapshot(path.parent) == before  # refused before anything was written
    with DataStore(path, max_bytes=larger * MIN_STORE_BYTES) as s:  # and not left locked
        assert len(s) == count
        keep = count // larger // 2
        for i in range(keep, count):
            s.delete(f"k{i:05d}")
        s.compact()
    with DataStore(path, max_bytes=MIN_STORE_BYTES) as s:  # small enough now
        assert len(s) == keep
        assert files_size(path) <= counted_size(s) <= MIN_STORE_BYTES


@pytest.fixture
def bind_mount(tmp_path):
    """The same folder under a second name that realpath does not unify."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("a bind mount needs root on Linux")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    if subprocess.run(["mount", "--bind", str(tmp_path / "a"), str(tmp_path / "b")],
                      capture_output=True).returncode:
        pytest.skip("cannot bind-mount here")
    yield tmp_path / "a", tmp_path / "b"
    subprocess.run(["umount", "-l", str(tmp_path / "b")], check=True)


def test_a_second_spelling_of_the_same_files_is_refused_and_keeps_the_lock(bind_mount):
    first, second = bind_mount
    assert os.path.realpath(first) != os.path.realpath(second)
    with DataStore(first / "store") as s:
        s.create("k", {"v": 1})
        with pytest.raises(StoreLockedError, match="already open in this process"):
            DataStore(second / "store")
        assert run_python(OPEN_IN_CHILD, second / "store").stdout.startswith("locked:")
        assert s.read("k") == {"v": 1}


@POSIX_ONLY
def test_a_forked_child_does_not_keep_the_store_locked(path):
    store = DataStore(path)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # a long-lived worker that never uses the store
        os.read(read_end, 1)
        os._exit(0)
    try:
        store.close()
        assert run_python(OPEN_IN_CHILD, path).stdout.strip() == "opened"
    finally:
        os.write(write_end, b"x")
        os.waitpid(pid, 0)
        os.close(read_end), os.close(write_end)


def close_later(holder, seconds):
    """Tell the holder process to close its store after `seconds`."""
    def close():
        holder.stdin.write("close\n")
        holder.stdin.flush()
    timer = threading.Timer(seconds, close)
    timer.start()
    return timer


@POSIX_ONLY
@pytest.mark.parametrize("timeout", [pytest.param(10, id="10s"), pytest.param(None, id="none")])
def test_timeout_waits_for_another_process_to_close(path, holder, timeout):
    started = time.monotonic()
    close_later(holder, 0.5)
    with DataStore(path, timeout=timeout) as s:
        assert s.read("held") == {"by": "holder"}
    assert time.monotonic() - started >= 0.4


@POSIX_ONLY
def test_timeout_that_runs_out_says_how_long_it_waited(path, holder):
    started = time.monotonic()
    with pytest.raises(StoreLockedError, match=r"another process.*waiting 0.3 s"):
        DataStore(path, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 5


def test_timeout_on_a_store_this_process_holds_raises_at_once(path):
    with DataStore(path):
        started = time.monotonic()
        with pytest.raises(StoreLockedError, match="already open in this process"):
            DataStore(path, timeout=None)
        assert time.monotonic() - started < 1


@pytest.mark.parametrize("timeout, error", [
    pytest.param("1", DataStoreTypeError, id="str"),
    pytest.param(True, DataStoreTypeError, id="bool"),
    pytest.param(-1, DataStoreValueError, id="negative"),
    pytest.param(float("nan"), DataStoreValueError, id="nan"),
    pytest.param(float("inf"), DataStoreValueError, id="inf"),
    pytest.param(10 ** 400, DataStoreValueError, id="beyond-a-float"),
    pytest.param(2e9, DataStoreValueError, id="over-1e9"),
])
def test_bad_timeouts_are_refused(path, timeout, error):
    with pytest.raises(error, match="timeout"):
        DataStore(path, timeout=timeout)
    assert not path.parent.joinpath("store.dat").exists()
    DataStore(path, timeout=1e9).close()  # the largest allowed


@POSIX_ONLY
def test_forked_child_cannot_use_the_store_and_writes_nothing(path):
    store = DataStore(path)
    store.create("k", {"v": 1})
    before = snapshot(path.parent)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what happened through the pipe
        outcome = []
        for call in (lambda: store.read("k"), lambda: store.create("c", {}),
                     lambda: store.delete("k"), store.sync):
            try:
                call()
                outcome.append("worked")
            except StoreForkedError:
                outcome.append("refused")
        store.close()  # forgets the store, writes nothing
        os.write(write_end, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    with os.fdopen(read_end) as f:
        assert json.loads(f.read()) == ["refused"] * 4
    assert snapshot(path.parent) == before
    assert run_python(OPEN_IN_CHILD, path).stdout.startswith("locked:")
    assert store.read("k") == {"v": 1}
    store.close()


@POSIX_ONLY
def test_forked_child_exiting_normally_leaves_the_parents_files_and_lock(path):
    # The child runs atexit and garbage collection, where a store would
    # write its index at close; the store must stop it.
    code = """
        import hashlib, os, sys, datastore
        from pathlib import Path
        store = datastore.DataStore(sys.argv[1])
        for i in range(50):
            store.create(f"k{i}", {"v": i})
        store.delete("k0")
        digest = lambda: [hashlib.sha256(Path(sys.argv[1] + s).read_bytes()).hexdigest()
                          for s in (".dat", ".idx")]
        before = digest()
        pid = os.fork()
        if pid == 0:
            sys.exit(0)          # a normal exit: atexit handlers, then teardown
        os.waitpid(pid, 0)
        print("unchanged" if digest() == before else "changed", flush=True)
        sys.stdin.readline()
        store.create("after", {"v": 1})
        store.close()
    """
    proc = spawn_python(code, path)
    try:
        expect_line(proc, "unchanged")
        assert run_python(OPEN_IN_CHILD, path).stdout.startswith("locked:")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        proc.kill()
        proc.communicate()
    with DataStore(path) as s:
        assert s.read("after") == {"v": 1} and s.read("k49") == {"v": 49}


def test_a_store_dropped_without_close_is_closed_and_can_be_opened_again(path, caplog):
    def use_and_forget():
        DataStore(path).create("k", {"v": 1})  # never closed

    caplog.set_level(logging.INFO, logger="datastore")
    use_and_forget()
    use_and_forget.__code__  # (the store is gone with the call's frame)
    with DataStore(path) as s:  # in the same process: no "already open"
        assert s.read("k") == {"v": 1}
    assert "recovered" not in caplog.text  # closed cleanly, not left to recovery


def test_module_close_closes_the_default_store_and_the_next_call_opens_it_again(
        tmp_path, monkeypatch, fresh_default):
    monkeypatch.setenv("DATASTORE_PATH", str(tmp_path / "store"))
    datastore.create("k", {"v": 1})
    datastore.close()
    with DataStore(tmp_path / "store") as s:  # closed: written, and no longer held
        assert s.read("k") == {"v": 1}
    assert datastore.read("k") == {"v": 1}  # opened again on the next call
    datastore.close()
    datastore.close()  # closing a closed default store does nothing


# --- Threads --------------------------------------------------------------

def test_sixteen_threads_racing_to_create_one_key_one_wins(store):
    barrier = threading.Barrier(16)
    results = []

    def racer(i):
        barrier.wait()
        try:
            store.create("prize", {"winner": i})
            results.append(("won", i))
        except KeyExistsError:
            results.append(("lost", i))

    run_threads(racer, 16)
    winners = [i for outcome, i in results if outcome == "won"]
    assert len(winners) == 1 and len(results) == 16
    assert store.read("prize") == {"winner": winners[0]}


@SLOW
def test_eight_threads_with_their_own_keys_lose_nothing(path):
    per_thread = 1500
    errors = []
    with DataStore(path) as s:
        def worker(t):
            try:
                for i in range(per_thread):
                    s.create(f"t{t}-{i}", {"t": t, "i": i})
                    assert s.read(f"t{t}-{i}") == {"t": t, "i": i}
                    if i % 3 == 0:
                        s.delete(f"t{t}-{i}")
            except Exception as exc:  # reported below, with the thread
                errors.append((t, repr(exc)))

        run_threads(worker, 8)
    assert errors == []
    with DataStore(path) as s:
        for t in range(8):
            for i in range(per_thread):
                if i % 3 == 0:
                    with pytest.raises(KeyNotFoundError):
                        s.read(f"t{t}-{i}")
                else:
                    assert s.read(f"t{t}-{i}") == {"t": t, "i": i}


def test_threads_reading_while_others_delete_and_compact(path):
    with DataStore(path, max_bytes=MIN_STORE_BYTES * 4) as s:
        for i in range(100):
            s.create(f"stay{i}", {"i": i})
        stop = threading.Event()
        errors = []

        def reader(_):
            while not stop.is_set():
                for i in range(0, 100, 7):
                    if s.read(f"stay{i}") != {"i": i}:
                        errors.append(i)

        def churner(_):
            try:
                for i in range(600):
                    s.create(f"tmp{i}", {"pad": "x" * 300})
                    s.delete(f"tmp{i}")
                    if i % 200 == 0:
                        s.compact()
            finally:
                stop.set()

        run_threads(lambda i: churner(i) if i == 0 else reader(i), 4)
        assert errors == []


# --- Default location -----------------------------------------------------

def test_module_functions_use_the_store_in_xdg_data_home(tmp_path, monkeypatch, fresh_default):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    datastore.create("k", {"v": 1}, ttl=60)
    assert datastore.read("k") == {"v": 1}
    datastore.delete("k")
    with pytest.raises(KeyNotFoundError):
        datastore.read("k")
    with pytest.raises(StoreLockedError, match="already open in this process"):
        DataStore(tmp_path / "xdg" / "datastore" / "default")  # the default store is open there
    datastore.create("kept", {"v": 2})
    datastore.close()  # as at interpreter exit
    with DataStore(tmp_path / "xdg" / "datastore" / "default") as s:
        assert s.read("kept") == {"v": 2}


@POSIX_ONLY
def test_default_folder_is_private_and_files_are_owner_only(tmp_path, monkeypatch, fresh_default):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    datastore.create("k", {"v": 1})
    folder = tmp_path / ".local" / "share" / "datastore"
    assert folder.stat().st_mode & 0o777 == 0o700
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes == {"default.dat": 0o600, "default.idx": 0o600, "default.lock": 0o600}


@POSIX_ONLY
def test_a_default_folder_open_to_others_is_made_private(tmp_path, monkeypatch, fresh_default):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    (tmp_path / "datastore").mkdir(mode=0o777)
    os.chmod(tmp_path / "datastore", 0o777)
    datastore.create("k", {})
    assert (tmp_path / "datastore").stat().st_mode & 0o777 == 0o700


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
@pytest.mark.parametrize("link", [pytest.param(False, id="folder"), pytest.param(True, id="symlink")])
def test_a_default_folder_owned_by_someone_else_is_refused(tmp_path, monkeypatch,
                                                          fresh_default, link):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    theirs = tmp_path / ("theirs" if link else "datastore")
    theirs.mkdir()
    os.chown(theirs, 12345, 12345)
    if link:
        (tmp_path / "datastore").symlink_to(theirs)
    with pytest.raises(DataStoreError, match="not a folder of yours.*DATASTORE_PATH"):
        datastore.create("k", {})
    assert list(theirs.iterdir()) == []


# --- The size cap ---------------------------------------------------------

def test_files_never_exceed_max_bytes_and_full_store_still_reads_and_deletes(path):
    with DataStore(path, max_bytes=MIN_STORE_BYTES) as s:
        count = fill(s, "k")
        assert count > 50
        before = snapshot(path.parent)
        with pytest.raises(StoreFullError, match="full.*max_bytes=65536"):
            s.create("one more", {"pad": "x" * 400})
        assert snapshot(path.parent) == before  # nothing to reclaim: nothing written
        assert s.read("k00000") == {"pad": "x" * 400}
        s.delete("k00000")
        assert files_size(path) <= s.max_bytes
    assert files_size(path) <= MIN_STORE_BYTES  # also after close writes .idx


def test_the_write_exactly_at_the_cap_fits_and_the_next_does_not(path):
    # Fill with the smallest records, so the last one lands within a few bytes.
    with DataStore(path, max_bytes=MIN_STORE_BYTES) as s:
        count = 0
        while True:
            try:
                s.create(f"{count:x}", {})
            except StoreFullError:
                break
            count += 1
        kept = BLOCK  # room for set() to write a copy of the largest record
        # A record's block, or a page the index would need to split a bucket
        page = 4096
        assert MIN_STORE_BYTES - counted_size(s) < page + BLOCK + kept
    assert MIN_STORE_BYTES - page - BLOCK - kept < files_size(path) <= MIN_STORE_BYTES


def test_on_a_full_store_each_delete_makes_room_for_one_more_value_of_its_size(path):
    # Whatever the index needs for the new key: a bucket it would split when
    # there is no room for another page takes the entry beside it instead.
    rng = random.Random(3)
    cap = MIN_STORE_BYTES * 8
    with DataStore(path, max_bytes=cap) as s:
        count = fill(s, "k", size=100)
        live = [f"k{i:05d}" for i in range(count)]
        for step in range(4 * count):
            s.delete(live.pop(rng.randrange(len(live))))
            live.append(f"n{step:06d}")
            s.create(live[-1], {"pad": "x" * 100})  # never StoreFullError
            assert files_size(path) <= counted_size(s) <= cap
    for _ in range(2):  # what close saved (entries beside the buckets too) opens whole
        with DataStore(path, max_bytes=cap) as s:
            assert sorted(s.keys()) == sorted(live)
            assert all(s.read(key) == {"pad": "x" * 100} for key in live[-50:])
    with DataStore(path, max_bytes=cap) as s:
        s.compact()  # rebuilds the index: the entries go into buckets
        assert not s._engine.index.spilled and sorted(s.keys()) == sorted(live)


def test_deletes_on_a_full_store_never_take_its_files_over_the_cap(path):
    # Each scattered delete leaves a free extent, which close() records:
    # room for them is kept, so neither the deletes nor the close pass it.
    cap = MIN_STORE_BYTES * 16
    with DataStore(path, max_bytes=cap) as s:
        count = fill(s, "k", size=100)
        for i in range(0, count - 10, 5):  # a fifth, scattered: too few to move records
            s.delete(f"k{i:05d}")
            assert files_size(path) <= counted_size(s) <= s.max_bytes
    assert files_size(path) <= cap
    with DataStore(path, max_bytes=cap) as s:  # its own cap still opens it
        assert len(s) == count - len(range(0, count - 10, 5))


def test_space_comes_back_after_deleting_everything(path):
    with DataStore(path, max_bytes=MIN_STORE_BYTES * 2) as s:
        first = fill(s, "a")
        for i in range(first):
            s.delete(f"a{i:05d}")
        second = fill(s, "b")
        assert second == first


def test_space_comes_back_after_expiry_without_reading(path, clock):
    with DataStore(path, max_bytes=MIN_STORE_BYTES * 2) as s:
        s._clock = clock
        first = fill(s, "a", ttl=1)
        clock.advance(2)
        second = fill(s, "b", ttl=1)
        assert second == first


def test_space_comes_back_after_reopen_too(path):
    with DataStore(path, max_bytes=MIN_STORE_BYTES * 2) as s:
        first = fill(s, "a")
        for i in range(first):
            s.delete(f"a{i:05d}")
    with DataStore(path, max_bytes=MIN_STORE_BYTES * 2) as s:
        assert fill(s, "b") == first


def test_compaction_leaves_no_free_block_and_keeps_live_data(path):
    with DataStore(path) as s:
        for i in range(300):
            s.create(f"k{i}", {"i": i, "pad": "x" * 600})  # eleven blocks each
        s._engine._move = lambda limit: 0  # no upkeep: compact() does it all
        for i in range(0, 300, 2):
            s.delete(f"k{i}")
        assert files_size(path) > 300 * 11 * BLOCK
        del s._engine._move
        s.compact()
        assert os.path.getsize(f"{path}.dat") == BLOCK * (1 + 150 * 11)
        assert s._engine.free.blocks == 0
        for i in range(300):
            if i % 2:
                assert s.read(f"k{i}") == {"i": i, "pad": "x" * 600}
            else:
                with pytest.raises(KeyNotFoundError):
                    s.read(f"k{i}")
    assert sorted(p.name for p in path.parent.iterdir()) == ["store.dat", "store.idx",
                                                              "store.lock"]


def test_compaction_gives_back_the_room_of_deleted_small_values_too(path):
    big = {"v": "x" * 16000}
    with DataStore(path) as s:
        for i in range(4000):
            s.create(f"k{i:04d}", {})  # a block each
        s.create("big", big)  # at the end, and it fits no hole: compact() must sweep
        s._engine._move = lambda limit: 0  # no upkeep: compact() does it all
        for i in range(0, 4000, 2):
            s.delete(f"k{i:04d}")
        before = os.path.getsize(f"{path}.dat")
        del s._engine._move
        s.compact()
        assert os.path.getsize(f"{path}.dat") < 0.7 * before
        assert len(s) == 2001 and s.read("k3999") == {} and s.read("big") == big


@SLOW
def test_fill_the_default_one_gib_with_16_kib_values(path):
    value = value_of_size(MAX_VALUE_BYTES)
    with DataStore(path) as s:
        assert s.max_bytes == MAX_STORE_BYTES
        count = 0
        while True:
            try:
                s.create(f"{count}", value)
            except StoreFullError:
                break
            count += 1
        assert files_size(path) <= MAX_STORE_BYTES
        assert count > 0.95 * MAX_STORE_BYTES / (257 * BLOCK)  # 257 blocks a value
        assert s.read("0") == value and s.read(str(count - 1)) == value
    assert files_size(path) <= MAX_STORE_BYTES


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_sync_fsyncs_the_data_file_and_close_fsyncs_both(path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    with DataStore(path) as s:
        s.create("k", {"v": 1})
        monkeypatch.setattr(os, "fsync", recording_fsync)
        s.sync()
        assert synced == ["store.dat"]
        synced.clear()
    # The data, then the index (its pages, then its header), then the
    # data file's header's "closed" mark.
    assert synced == ["store.dat", "store.idx", "store.idx", "store.dat"]


def test_a_failed_fsync_refuses_writes_until_the_store_is_reopened(path, monkeypatch):
    s = DataStore(path)
    s.create("kept", {"v": 1})

    def failing_fsync(fd):
        raise OSError(errno.EIO, "injected")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="injected"):
            s.sync()
    for write in (lambda: s.create("new", {}), lambda: s.delete("kept"), s.sync, s.compact):
        with pytest.raises(OSError, match="fsync .* failed .* open it again"):
            write()
    assert s.read("kept") == {"v": 1}
    s.close()  # releases the lock without trusting the files: the next open scans
    with DataStore(path) as s:
        assert s.read("kept") == {"v": 1}
        s.create("new", {})


def test_close_releases_the_lock_and_registry_even_when_it_raises(path, monkeypatch):
    s = DataStore(path)
    s.create("k", {"v": 1})
    with monkeypatch.context() as patch:
        patch.setattr(os, "ftruncate", lambda fd, size: (_ for _ in ()).throw(OSError(errno.EIO, "injected")))
        with pytest.raises(OSError, match="injected"):
            s.close()
    with pytest.raises(StoreClosedError):
        s.read("k")
    assert run_python(OPEN_IN_CHILD, path).stdout.strip() == "opened"
    with DataStore(path) as again:
        assert again.read("k") == {"v": 1}


def test_a_full_store_takes_a_same_size_value_after_one_delete(path):
    with DataStore(path, max_bytes=MIN_STORE_BYTES) as s:
        fill(s, "k", size=700)
        s.delete("k00007")
        s.create("n00007", {"pad": "x" * 700})  # another key of the same length
        with pytest.raises(StoreFullError):
            s.create("n00008", {"pad": "x" * 700})
        assert counted_size(s) <= s.max_bytes


def test_a_full_store_takes_a_same_size_value_after_one_expires(path, clock):
    with DataStore(path, max_bytes=MIN_STORE_BYTES) as s:
        s._clock = clock
        s.create("t0000", {"pad": "x" * 700}, ttl=5)
        fill(s, "k", size=700)
        clock.advance(5)
        s.create("n0000", {"pad": "x" * 700})  # no read of "t0000" first
        assert counted_size(s) <= s.max_bytes


POLLER = """
    import os, sys, time
    folder, name = sys.argv[1], sys.argv[2]
    print("polling", flush=True)
    largest = 0
    while not os.path.exists(os.path.join(folder, "stop")):
        total = 0
        for entry in os.scandir(folder):
            if entry.name.startswith(name + "."):
                try:
                    total += entry.stat().st_size
                except FileNotFoundError:
                    pass
        largest = max(largest, total)
        time.sleep(0.001)
    print(largest, flush=True)
"""


def test_another_process_never_sees_the_files_over_max_bytes(tmp_path, clock):
    path, max_bytes = tmp_path / "store", MIN_STORE_BYTES * 4
    poller = spawn_python(POLLER, tmp_path, "store")
    rng = random.Random(5)
    moves = []
    try:
        expect_line(poller, "polling")
        with DataStore(path, max_bytes=max_bytes) as s:
            s._clock = clock
            move = s._engine._move
            s._engine._move = lambda limit: moves.append(move(limit)) or moves[-1]
            live = []
            for i in range(6000):
                if live and rng.random() < (0.7 if counted_size(s) > 0.9 * max_bytes else 0.3):
                    s.delete(live.pop(rng.randrange(len(live))))
                else:
                    ttl = rng.choice([None, None, 1])
                    try:
                        s.create(f"k{i}", {"pad": "x" * rng.randrange(2000)}, ttl=ttl)
                    except StoreFullError:
                        continue
                    if not ttl:
                        live.append(f"k{i}")
                clock.advance(0.01)
                if i % 1500 == 1499:
                    s.compact()
        (tmp_path / "stop").touch()
        largest = int(poller.stdout.readline())
    finally:
        poller.kill()
        poller.communicate()
    assert sum(moves) > 30  # records did move while the poller watched
    assert 0.8 * max_bytes < largest <= max_bytes


# --- Crash safety ---------------------------------------------------------

CRASH_WORKER = """
    import json, random, sys, datastore
    path, start, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    live = json.loads(sys.stdin.readline())
    rng = random.Random(seed)
    store = datastore.DataStore(path, max_bytes=datastore.MIN_STORE_BYTES * 2)
    engine = store._engine
    move = engine._move     # report moves of records, to prove some were cut

    def reported(limit):
        print("moving", flush=True)
        moved = move(limit)
        print("moved", moved, flush=True)
        return moved

    engine._move = reported
    print("ready", flush=True)
    i = start
    while True:
        if rng.random() < 0.02:
            print("begin M", flush=True)
            store.compact()
        elif live and rng.random() < 0.2:
            key, size = rng.choice(live), rng.randrange(0, 1500)
            print("begin S", key, size, flush=True)
            try:
                store.set(key, {"key": key, "pad": "x" * size})
            except datastore.StoreFullError:
                print("full", flush=True)
                continue
        elif live and rng.random() < 0.45:
            key = live.pop(rng.randrange(len(live)))
            print("begin D", key, flush=True)
            store.delete(key)
        else:
            key, size = f"k{i}", rng.randrange(0, 1500)
            i += 1
            print("begin C", key, size, flush=True)
            try:
                store.create(key, {"key": key, "pad": "x" * size})
            except datastore.StoreFullError:
                print("full", flush=True)
                continue
            live.append(key)
        print("done", flush=True)
"""


def value_for(key, size):
    return {"key": key, "pad": "x" * size}


@SLOW
@POSIX_ONLY
def test_kill_9_at_random_instants_loses_no_acknowledged_operation(path, caplog):
    rng = random.Random(1234)
    live = {}  # key -> pad size, as acknowledged so far
    deleted = set()
    kills = moves = kills_in_move = 0
    # 24 rounds; then, while fewer than 3 kills have landed inside a move
    # (a fast disk can finish a batch before the signal lands), more early ones.
    round_number = 0
    while round_number < 24 or (kills_in_move < 3 and round_number < 64):
        early_kill = round_number % 3 == 0 or round_number >= 24
        proc = spawn_python(CRASH_WORKER, path, round_number * 100_000, round_number)
        round_number += 1
        proc.stdin.write(json.dumps(sorted(live)) + "\n")
        proc.stdin.flush()
        expect_line(proc, "ready")
        early = ""  # every third round, kill just as records start to move
        while early_kill and not early.endswith("moving\n"):
            line = proc.stdout.readline()
            if not line:  # the worker died: the checks below will say why
                break
            early += line
        time.sleep(rng.uniform(0.0, 0.0005 if early_kill else 0.25))
        proc.send_signal(signal.SIGKILL)
        out = early + proc.stdout.read()  # not communicate(): readline() buffered some
        proc.wait(timeout=30)
        proc.stdin.close(), proc.stdout.close(), proc.stderr.close()
        kills += 1
        lines = out.splitlines()
        if lines and not out.endswith("\n"):
            lines.pop()  # a line cut by the kill: that operation is in flight
        moves += sum(int(line.split()[1]) for line in lines if line.startswith("moved "))
        kills_in_move += out.count("moving") > out.count("moved")
        in_flight = None
        for line in lines:
            if line.startswith("begin"):
                in_flight = line.split()[1:]
            elif line in ("done", "full"):
                if line == "done" and in_flight[0] in "CS":
                    live[in_flight[1]] = int(in_flight[2])
                elif line == "done" and in_flight[0] == "D":
                    deleted.add(in_flight[1])
                    del live[in_flight[1]]
                in_flight = None
        caplog.clear()
        with DataStore(path, max_bytes=MIN_STORE_BYTES * 2) as s:
            assert files_size(path) <= counted_size(s) <= s.max_bytes
            content = live_content(s)
        if in_flight and in_flight[0] == "D" and in_flight[1] not in content:
            deleted.add(in_flight[1])  # the delete in flight happened
            del live[in_flight[1]]
        if in_flight and in_flight[0] in "CS" and content.get(in_flight[1]) == value_for(
                in_flight[1], int(in_flight[2])):
            live[in_flight[1]] = int(in_flight[2])  # the create or set in flight happened
        assert content == {key: value_for(key, size) for key, size in live.items()}
        assert not deleted & set(content)
        assert "damaged" not in caplog.text  # a crash is not damage
        # Nothing else is there, by the index written at close, trusted as the
        # next open finds it.
        with DataStore(path, max_bytes=MIN_STORE_BYTES * 2) as s:
            assert set(s.keys()) == set(live) and len(s) == len(live)
    assert kills >= 20 and len(deleted) > 20
    assert moves > 100 and kills_in_move >= 3, (moves, kills_in_move)


# A child that SIGKILLs itself just before its n-th file-system step: every
# open, write, fsync, truncate, rename or remove of a file.
CRASH_AT_STEP = """
    import os, signal, sys, time, datastore
    path, action, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
    count = 0

    def counted(real):
        def wrapper(*args, **kwargs):
            global count
            count += 1
            if count == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return wrapper

    def hook():
        for name in ("open", "write", "pwrite", "fsync", "ftruncate", "replace",
                     "rename", "remove", "unlink"):
            setattr(os, name, counted(getattr(os, name)))

    opening = action in ("recover", "convert", "convert-3")
    if opening:
        hook()
    store = datastore.DataStore(path, max_bytes=2 ** 20)
    store._clock = lambda: time.time() + 3600   # the ttl keys have expired
    if not opening:
        hook()
    if action == "reuse":        # a new record in part of a free extent
        store.create("new", {"v": "n" * 1200})
    elif action == "move":       # records from the end into free extents
        store.compact()
    elif action == "truncate":   # the last record deleted, the file cut
        store.delete(sys.argv[4])
    elif action == "reclaim":    # expired keys freed by the next writes
        store.create("ttl", {"v": "again"})
        store.create("new", {"v": 1})
    elif action == "set":        # over a value an earlier sync() made durable
        store.sync()
        store.set("k5", {"v": "new", "pad": "s" * 1500})
    elif action == "close":      # of a store written to since it opened: it saves .idx
        store._engine.changed = True
        store.close()
    print("finished", count, flush=True)
    os._exit(0)                  # no close: each action is tested alone
"""


# After a first crash and its recovery, delete everything and crash again:
# a copy of a key that recovery left valid would come back.
DELETE_ALL_AND_CRASH = """
    import os, sys, datastore
    store = datastore.DataStore(sys.argv[1], max_bytes=2 ** 20)
    for key in store._engine.keys(0.0):
        store._engine.remove(key, 0.0)
    os._exit(0)
"""


def prepare_store_for_crash(path, clock):
    """A store with free extents in the middle, records after them, keys with
    a ttl, and a key moved by a re-create. Returns what it holds."""
    expected = {}
    with DataStore(path, max_bytes=2 ** 20) as s:
        s._clock = clock
        s._engine._move = lambda limit: 0  # keep the free extents in place
        for i in range(12):
            s.create(f"k{i}", {"i": i, "pad": "x" * (i * 90)})
            expected[f"k{i}"] = {"i": i, "pad": "x" * (i * 90)}
        s.create("ttl", {"v": 1}, ttl=60)
        s.create("ttl2", {"v": 2}, ttl=60)
        s.create("big", {"pad": "b" * 3000})
        for i in range(12, 16):
            s.create(f"k{i}", {"i": i})
            expected[f"k{i}"] = {"i": i}
        for key in ("k3", "big", "k6", "k9"):
            s.delete(key)
            expected.pop(key, None)
        s.create("k3", {"again": "y" * 1200})  # larger: lands elsewhere
        expected["k3"] = {"again": "y" * 1200}
    records = value_records(Path(f"{path}.dat").read_bytes())  # block -> key, on disk
    return expected, records[max(records)].decode()  # the key whose record ends .dat


def left_dirty(path):
    """Leave the store as a writer killed in the middle of moving records
    would: header "open", two copies of the keys it was moving."""
    code = """
        import os, sys, datastore
        s = datastore.DataStore(sys.argv[1], max_bytes=2 ** 20)
        s.create("late", {"v": "late"})
        s.delete("k1")
        os.ftruncate = lambda fd, size: os._exit(0)  # killed before the truncate
        s.compact()
    """
    result = run_python(code, path)
    assert result.returncode == 0, result.stderr


CRASH_ACTIONS = {  # what each action may leave, in order, as changes to the store
    "reuse": [{}, {"new": {"v": "n" * 1200}}],
    "move": [{}],
    "truncate": [{}, {"LAST": None}],
    "reclaim": [{}, {"ttl": {"v": "again"}}, {"ttl": {"v": "again"}, "new": {"v": 1}}],
    "set": [{}, {"k5": {"v": "new", "pad": "s" * 1500}}],
    "close": [{}],
    "recover": [{}],
    "convert": [{}],
    "convert-3": [{}],
}


@SLOW
@POSIX_ONLY
@pytest.mark.parametrize("action", list(CRASH_ACTIONS))
def test_kill_9_at_every_file_system_step_then_again_after_deleting(tmp_path, action, clock):
    template = tmp_path / "template" / "store"
    if action in ("convert", "convert-3"):
        template.parent.mkdir()
        fixture, suffixes = ("1.0", ".dir") if action == "convert" else ("3.1", ".idx")
        for suffix in (".dat", suffixes):
            shutil.copy(ROOT / "fixtures" / f"store-{fixture}-crashed{suffix}",
                        f"{template}{suffix}")
        expected, last = dict(V1_CRASHED_CONTENT), None
    else:
        expected, last = prepare_store_for_crash(template, clock)
    if action == "recover":
        left_dirty(template)
        expected["late"] = {"v": "late"}
        del expected["k1"]
    states = []  # the keys with a ttl of 60 s have expired for the child
    for change in CRASH_ACTIONS[action]:
        state = {k: v for k, v in expected.items() if not k.startswith("ttl")}
        state.update(change)
        if "LAST" in change:
            del state["LAST"], state[last]
        states.append(state)
    step = 1
    while True:
        path = tmp_path / f"step{step}" / "store"
        shutil.copytree(template.parent, path.parent)
        result = run_python(CRASH_AT_STEP, path, action, step, last or "")
        killed = result.returncode == -signal.SIGKILL
        assert killed or result.returncode == 0, result.stderr
        with DataStore(path, max_bytes=2 ** 20) as s:
            s._clock = lambda: time.time() + 3600
            content = live_content(s)
            assert content in states, (action, step)
        assert run_python(DELETE_ALL_AND_CRASH, path).returncode == 0
        with DataStore(path, max_bytes=2 ** 20) as s:
            assert live_content(s) == {}, (action, step)
        if not killed:
            break
        step += 1
    # The hook did cut the run short at each step before this one. (It sees
    # os calls only: the store opens its files through io.FileIO.)
    assert step > {"reuse": 2, "truncate": 2, "reclaim": 4, "set": 4, "recover": 4}.get(action, 5)
    assert result.stdout.split() == ["finished", str(step - 1)]
    assert content == states[-1]


SIGTERM_WORKER = """
    import signal, sys, time, datastore
    if sys.argv[2] == "handled":  # the README's lines
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    store = datastore.DataStore(sys.argv[1])
    store.create("k", {"v": 1})
    print("ready", flush=True)
    time.sleep(60)
"""


@POSIX_ONLY
@pytest.mark.parametrize("handled", [pytest.param(True, id="with-the-readme-lines"),
                                     pytest.param(False, id="without")])
def test_sigterm_closes_cleanly_with_the_readmes_three_lines(path, caplog, handled):
    proc = spawn_python(SIGTERM_WORKER, path, "handled" if handled else "plain")
    try:
        expect_line(proc, "ready")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    caplog.set_level(logging.INFO, logger="datastore")
    with DataStore(path) as s:
        assert s.read("k") == {"v": 1}
    assert ("recovered" in caplog.text) is not handled


def test_reopening_a_full_store_changes_nothing_counted(path):
    with DataStore(path, max_bytes=MIN_STORE_BYTES) as s:
        count = fill(s, "k", size=450)  # each record ends mid-block
        for i in range(count):
            s.set(f"k{i:05d}", {"pad": "y" * 450})  # room kept for set(), padding and all
        s.delete("k00002")  # a free extent, whose key close() saves if it fits
        counted = counted_size(s)
    with DataStore(path, max_bytes=MIN_STORE_BYTES) as s:
        assert files_size(path) <= counted_size(s) <= MIN_STORE_BYTES
        s.create("k00002", {"pad": "x" * 450})  # the first write drops what close saved
        assert files_size(path) <= counted_size(s) <= counted  # (close trimmed a free tail)


RENAMED_HOLDER = """
    import sys, datastore
    store = datastore.DataStore(sys.argv[1])
    store.create("a", {"by": "first"})
    print("ready", flush=True)
    sys.stdin.readline()
    store.create("a2", {"by": "first"})
    store.delete("a")
    store.close()
    print("closed", flush=True)
"""


@POSIX_ONLY
def test_a_renamed_folder_keeps_the_writes_of_the_process_that_opened_it(tmp_path):
    old, new = tmp_path / "old", tmp_path / "new"
    proc = spawn_python(RENAMED_HOLDER, old / "store")
    try:
        expect_line(proc, "ready")
        old.rename(new)
        second = """
            import sys, datastore
            with datastore.DataStore(sys.argv[1]) as s:
                s.create("b", {"by": "second"})
        """
        assert run_python(second, old / "store").returncode == 0
        proc.stdin.write("go\n")
        proc.stdin.flush()
        expect_line(proc, "closed")
    finally:
        proc.kill()
        proc.communicate()
    with DataStore(old / "store") as s:
        assert live_content(s) == {"b": {"by": "second"}}
    with DataStore(new / "store") as s:
        assert live_content(s) == {"a2": {"by": "first"}}


def test_a_reclaimed_expired_key_stays_gone_when_the_clock_goes_back(path, clock):
    s = DataStore(path)
    s._clock = clock
    s._engine._move = lambda limit: 0  # no move may overwrite the expired record
    s.create("k", {"v": 1}, ttl=10)
    clock.advance(10)
    s.create("other", {})  # the write that reclaims "k"
    assert s._engine.lookup(b"k") is None
    clock.advance(-10)
    with pytest.raises(KeyNotFoundError):
        s.read("k")
    abandon(s)  # and after a crash, which scans .dat
    with DataStore(path) as s:
        s._clock = clock
        assert live_content(s) == {"other": {}}


# --- Corrupt or foreign files ---------------------------------------------

@pytest.mark.parametrize("content", [
    pytest.param(b"", id="empty"), pytest.param(b"garbage", id="garbage"),
    pytest.param(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40, id="png"),
    pytest.param(b"\x00" * 4096, id="zeros"),
    pytest.param(b"DataStr1" + b"\x00" * 100, id="1.0-magic-only"),
    pytest.param(b"DataStr2" + b"\x00" * 100, id="2.0-magic-only"),
])
def test_foreign_data_file_raises_corrupt_store_error_and_is_left_alone(path, content):
    make_store(path)
    Path(f"{path}.dat").write_bytes(content)
    before = snapshot(path.parent)
    with pytest.raises(CorruptStoreError) as info:
        DataStore(path)
    assert str(path) in str(info.value)
    assert snapshot(path.parent) == before


def test_index_without_data_file_raises_corrupt_store_error(path):
    make_store(path)
    os.remove(f"{path}.dat")
    before = snapshot(path.parent)
    with pytest.raises(CorruptStoreError, match="missing"):
        DataStore(path)
    assert snapshot(path.parent) == before


def flip(data, at):
    return data[:at] + bytes([data[at] ^ 1]) + data[at + 1:]


@pytest.mark.parametrize("damage", [
    pytest.param(lambda data: b"", id="emptied"),
    pytest.param(lambda data: data[: len(data) // 2], id="cut-in-half"),
    pytest.param(lambda data: data[:-1], id="cut-by-a-byte"),
    pytest.param(lambda data: flip(data, 20), id="header-bit"),
    pytest.param(lambda data: flip(data, len(data) - 1), id="tail-bit"),
    pytest.param(lambda data: flip(data, 4096 + 100), id="bucket-bit"),  # found when used
    pytest.param(lambda data: flip(data, 4096 + 4), id="bucket-depth"),
    pytest.param(lambda data: bytes(len(data)), id="zeros"),
    pytest.param(lambda data: os.urandom(len(data)), id="garbage"),
    pytest.param(lambda data: data + data, id="doubled"),
])
def test_damaged_index_is_rebuilt_from_the_data_file(path, damage):
    make_store(path)
    idx = Path(f"{path}.idx")
    idx.write_bytes(damage(idx.read_bytes()))
    with DataStore(path) as s:
        for i in range(20):
            assert s.read(f"k{i}") == {"i": i}
        assert len(s) == 20 and sorted(s.keys()) == sorted(f"k{i}" for i in range(20))
        s.create("new", {})
    with DataStore(path) as s:  # and what the next open trusts is whole
        assert len(s) == 21 and s.read("k3") == {"i": 3}


@pytest.mark.parametrize("swap", ["older .dat", "older .idx", "another store's .idx"])
def test_an_index_file_is_trusted_only_with_the_data_file_it_was_closed_with(tmp_path, swap):
    # The sessions in between only delete: no sequence number moves, and
    # .dat keeps its size; the stamp a clean close writes in both still differs.
    path, other = tmp_path / "store", tmp_path / "other"
    make_store(path)
    make_store(other)
    saved = {suffix: Path(f"{path}{suffix}").read_bytes() for suffix in (".dat", ".idx")}
    with DataStore(path) as s:
        s.delete("k5")
    expected = {f"k{i}": {"i": i} for i in range(20) if i != 5}
    if swap == "older .dat":
        Path(f"{path}.dat").write_bytes(saved[".dat"])
        expected["k5"] = {"i": 5}  # .dat is the truth
    elif swap == "older .idx":
        Path(f"{path}.idx").write_bytes(saved[".idx"])
    else:
        Path(f"{path}.idx").write_bytes(Path(f"{other}.idx").read_bytes())
    for _ in range(2):  # and what the next open trusts is whole
        with DataStore(path) as s:
            assert live_content(s) == expected and len(s) == len(expected)
            assert s.check()["damaged_records"] == 0


def test_missing_index_is_rebuilt_from_the_data_file(path):
    make_store(path)
    os.remove(f"{path}.idx")
    with DataStore(path) as s:
        assert s.read("k7") == {"i": 7}


def test_damaged_record_raises_corrupt_store_error_on_read(path):
    make_store(path, 3)
    dat = Path(f"{path}.dat")
    data = bytearray(dat.read_bytes())
    data[data.index(b'{"i":1}') + 5] ^= 0x01  # flip a bit inside the value of k1
    dat.write_bytes(bytes(data))
    with DataStore(path) as s:
        assert s.read("k0") == {"i": 0}
        with pytest.raises(CorruptStoreError, match="damaged") as info:
            s.read("k1")
        assert str(path) in str(info.value)


def test_record_damaged_before_a_crash_is_dropped_by_recovery(path):
    make_store(path, 3)
    left_dirty_code = """
        import os, sys, datastore
        store = datastore.DataStore(sys.argv[1])  # kept open: then killed
        store.create("k9", {"i": 9})
        os._exit(0)
    """
    assert run_python(left_dirty_code, path).returncode == 0
    dat = Path(f"{path}.dat")
    data = bytearray(dat.read_bytes())
    data[data.index(b'{"i":1}') + 5] ^= 0x01
    dat.write_bytes(bytes(data))
    with DataStore(path) as s:
        assert s.read("k9") == {"i": 9} and s.read("k2") == {"i": 2}
        with pytest.raises(KeyNotFoundError):
            s.read("k1")


@POSIX_ONLY
@pytest.mark.parametrize("suffix", [".dat", ".idx", ".lock"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "folder"])
def test_anything_but_a_regular_file_is_refused_without_hanging(path, suffix, kind):
    if suffix != ".dat":
        make_store(path)
        os.remove(f"{path}{suffix}")
    if kind == "fifo":
        os.mkfifo(f"{path}{suffix}")
    elif kind == "dev-zero":
        os.symlink("/dev/zero", f"{path}{suffix}")
    else:
        os.mkdir(f"{path}{suffix}")
    code = """
        import sys, datastore
        try:
            datastore.DataStore(sys.argv[1]).close()
            print("opened")
        except datastore.DataStoreError as exc:
            print(type(exc).__name__, exc)
    """
    result = run_python(code, path, timeout=30)  # a hang fails here
    assert result.stdout.startswith("CorruptStoreError") and f"store{suffix}" in result.stdout, (
        result.stdout + result.stderr)


def test_check_reports_and_raises_for_a_damaged_record(path, clock):
    with DataStore(path) as s:
        s._clock = clock
        for i in range(10):
            s.create(f"k{i}", {"i": i}, ttl=5 if i < 2 else None)
        s.delete("k9")
        clock.advance(5)
        assert s.check() == {"keys": 9, "live_keys": 7, "damaged_records": 0, "dead_bytes": 0,
                             "lost_keys": 0}
    data = bytearray(Path(f"{path}.dat").read_bytes())
    data[data.index(b'{"i":5}') + 5] ^= 1
    Path(f"{path}.dat").write_bytes(bytes(data))
    with DataStore(path) as s:
        with pytest.raises(CorruptStoreError, match="1 damaged record.*'k5'"):
            s.check()
    status, out, err = cli("--path", path, "check")
    assert status == 1 and "1 damaged record" in err


def test_a_damaged_header_in_a_file_of_records_means_recover_not_foreign(path):
    make_store(path)
    data = bytearray(Path(f"{path}.dat").read_bytes())
    data[20] ^= 0xFF  # inside the header's fields: its CRC no longer matches
    Path(f"{path}.dat").write_bytes(bytes(data))
    with DataStore(path) as s:
        assert live_content(s) == {f"k{i}": {"i": i} for i in range(20)}


def test_recovery_warns_of_damage_a_crash_cannot_explain(path, caplog):
    s = DataStore(path)
    for i in range(40):
        s.create(f"k{i}", {"i": i, "pad": "x" * 600})
    abandon(s)
    data = bytearray(Path(f"{path}.dat").read_bytes())
    for key in (b"k5", b"k30"):  # two records far apart: more than one torn write
        data[data.index(b'"pad"', data.index(key + b'{"i"'))] ^= 1
    Path(f"{path}.dat").write_bytes(bytes(data))
    with DataStore(path) as s:
        assert len(live_content(s)) == 38
    assert (f"recovered 38 keys; skipped 2 damaged region(s) of {2 * 11 * BLOCK} bytes"
            in caplog.text)  # eleven blocks each


def cut_after_a_clean_close(path):
    """20 keys, closed cleanly, then 3,000 bytes cut off the end of .dat:
    the index table and the last few records."""
    with DataStore(path) as s:
        for i in range(20):
            s.create(f"k{i:02d}", {"i": i, "pad": "x" * 300})
    dat = Path(f"{path}.dat")
    with open(dat, "r+b") as f:
        f.truncate(dat.stat().st_size - 3000)


def test_a_store_cut_short_after_a_clean_close_warns_of_each_key_lost(tmp_path, caplog):
    path = tmp_path / "store"
    cut_after_a_clean_close(path)
    caplog.set_level(logging.INFO, logger="datastore")
    with DataStore(path) as s:
        survivors = len(s)
        lost = 20 - survivors
        assert lost >= 1
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and f"lost {lost} key(s)" in warnings[0].getMessage()
        assert "closed cleanly" in warnings[0].getMessage()
        assert not any("after a crash" in r.getMessage() for r in caplog.records)
        with pytest.raises(CorruptStoreError, match=f"lost {lost} key"):
            s.check()
    with DataStore(path) as s:  # closed cleanly again: what is left is whole
        assert len(s) == survivors
        assert s.check()["lost_keys"] == 0


def test_a_damaged_snapshot_of_a_clean_close_is_a_warning_even_if_nothing_is_lost(
        tmp_path, caplog):
    path = tmp_path / "store"
    with DataStore(path) as s:
        for i in range(5):
            s.create(f"k{i}", {"i": i})
    data = bytearray(Path(f"{path}.idx").read_bytes())
    data[20] ^= 1  # the index's header: its CRC no longer holds
    Path(f"{path}.idx").write_bytes(bytes(data))
    caplog.set_level(logging.INFO, logger="datastore")
    with DataStore(path) as s:
        assert sorted(s.keys()) == ["k0", "k1", "k2", "k3", "k4"]
        assert s.check()["lost_keys"] == 0  # (which ones, if any, cannot be told)
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in messages] == [logging.WARNING]
    assert "cannot be told, as its .idx is missing or damaged too" in messages[0][1]


def test_an_empty_store_whose_header_was_torn_opens_empty(tmp_path):
    path = tmp_path / "store"
    DataStore(path).close()
    with open(f"{path}.dat", "r+b") as f:
        f.write(b"\xff" * 20)  # a header write cut short by a power cut
    with DataStore(path) as s:
        assert len(s) == 0
        s.create("k", {})
    with DataStore(path) as s:
        assert s.read("k") == {}


def test_a_foreign_file_of_a_few_bytes_is_still_refused(tmp_path):
    path = tmp_path / "store"
    Path(f"{path}.dat").write_bytes(b"not ours" * 10)
    with pytest.raises(CorruptStoreError, match="not a datastore data file"):
        DataStore(path)
    assert Path(f"{path}.dat").read_bytes() == b"not ours" * 10


def test_an_emptied_dbm_dumb_database_is_not_taken_for_an_empty_store(tmp_path):
    path = tmp_path / "notes"
    with dbm.dumb.open(str(path), "c") as db:
        db[b"note"] = b"some other program's data" * 10
    with dbm.dumb.open(str(path), "w") as db:
        del db[b"note"]  # .dir empty, .dat keeps its bytes
    before = Path(f"{path}.dat").read_bytes()
    assert Path(f"{path}.dir").read_bytes() == b"" and 0 < len(before) <= 512
    with pytest.raises(CorruptStoreError, match="not a datastore data file"):
        DataStore(path)
    assert Path(f"{path}.dat").read_bytes() == before


def test_a_leftover_of_a_creator_killed_before_linking_is_removed(tmp_path):
    path = tmp_path / "store"
    Path(f"{path}.dat.12345.new").write_bytes(b"x" * 512)
    with DataStore(path) as s:
        s.create("k", {})
    assert not list(tmp_path.glob("store.dat.*"))


# --- I/O errors -------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 320 KiB (tmpfs), where the tests run as root on Linux."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux")
    folder = tmp_path / "small"
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", str(folder)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_full_disk_raises_oserror_and_leaves_a_working_store(small_disk):
    path = small_disk / "store"
    rng = random.Random(7)
    live, full = {}, 0
    s = DataStore(path, max_bytes=MIN_STORE_BYTES * 64)  # more than the disk holds
    for i in range(5000):
        value = {"pad": "x" * rng.randrange(100, 3000)}
        try:
            s.create(f"k{i}", value)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            full += 1
            with pytest.raises(KeyNotFoundError):
                s.read(f"k{i}")
            for victim in rng.sample(sorted(live), 3):  # deleting needs no room
                s.delete(victim)
                del live[victim]
            if full == 30:
                break
        else:
            live[f"k{i}"] = value
        assert files_size(path) <= counted_size(s)  # even after a short write
        if i % 50 == 0:
            assert live_content(s) == live
    assert full == 30 and live_content(s) == live
    try:
        s.close()  # writing .idx may not fit: then the next open scans .dat
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    with DataStore(path, max_bytes=MIN_STORE_BYTES * 64) as s:
        assert live_content(s) == live
        for key in sorted(live)[: len(live) // 2]:
            s.delete(key)
            del live[key]
        s.compact()
    with DataStore(path) as s:  # that close had room
        assert live_content(s) == live


def test_the_store_works_where_os_has_no_pread_or_pwrite(path, monkeypatch):
    monkeypatch.delattr(os, "pread")  # as on Windows: seek, then read or write
    monkeypatch.delattr(os, "pwrite")
    with DataStore(path) as s:
        for i in range(50):
            s.create(f"k{i}", {"i": i, "pad": "x" * (i * 50)})
        for i in range(0, 50, 2):
            s.delete(f"k{i}")
        s.compact()
    with DataStore(path) as s:
        assert live_content(s) == {f"k{i}": {"i": i, "pad": "x" * (i * 50)}
                                   for i in range(1, 50, 2)}


# --- Stores written by version 1.0 ----------------------------------------

# fixtures/store-1.0-*.{dat,dir} were written by datastore 1.0.0 (commit
# fb869e6), and fixtures/store-2.0-*.{dat,dir} by version 2 (commit dc48c8c,
# the "expired" key with the store's _clock set 100 s back), with these calls, then closed ("closed") or left as a killed
# process leaves a store ("crashed", after also creating "late" and deleting
# "k1"):
#     for i in range(10): s.create(f"k{i}", {"i": i, "pad": "x" * (i * 60)})
#     s.delete("k3"); s.delete("k5"); s.create("k5", {"again": "y" * 900})
#     s.delete("k7"); s.create("k7", {"small": True})
#     s.create("long", {"v": "ttl"}, ttl=10 ** 9)
#     s.create("ключ 🔑", {"unicode": "é"}); s.create("it's", {"quote": "'"})
#     s.create("expired", {"v": "gone"}, ttl=10)  # with the clock 100 s back
V1_CLOSED_CONTENT = {
    **{f"k{i}": {"i": i, "pad": "x" * (i * 60)} for i in (0, 1, 2, 4, 6, 8, 9)},
    "k5": {"again": "y" * 900}, "k7": {"small": True}, "long": {"v": "ttl"},
    "ключ 🔑": {"unicode": "é"}, "it's": {"quote": "'"},
}

V1_CRASHED_CONTENT = {**{k: v for k, v in V1_CLOSED_CONTENT.items() if k != "k1"},
                      "late": {"v": 1}}


@pytest.mark.parametrize("fixture, content", [
    pytest.param("closed", V1_CLOSED_CONTENT, id="closed"),
    pytest.param("crashed", V1_CRASHED_CONTENT, id="crashed"),
])
@pytest.mark.parametrize("version", ["1.0", "2.0"])
def test_a_store_written_by_version_1_or_2_is_converted_at_first_open(
        path, fixture, content, version):
    for suffix in (".dat", ".dir"):
        shutil.copy(ROOT / "fixtures" / f"store-{version}-{fixture}{suffix}", f"{path}{suffix}")
    Path(f"{path}.compact.dat").write_bytes(b"1.0's unfinished compaction")
    Path(f"{path}.bak").write_text("'k1', (0, 5)\n")
    with DataStore(path) as s:
        assert live_content(s) == content
        # 1.0 kept it until a write reclaims it; 2.0's writes had reclaimed it
        assert (s._engine.lookup(b"expired") is not None) == (version == "1.0")
        s.create("after", {"v": 2})
        s.delete("k0")
        assert s._engine.lookup(b"expired") is None
    names = sorted(p.name for p in path.parent.iterdir())
    leftovers = ["store.bak", "store.compact.dat"] if version == "2.0" else []  # not 2.0's
    assert names == leftovers + ["store.dat", "store.idx", "store.lock"]
    assert Path(f"{path}.dat").read_bytes()[:8] == b"DataStr4"
    content = dict(content, after={"v": 2})
    del content["k0"]
    with DataStore(path) as s:
        assert live_content(s) == content


@pytest.mark.parametrize("fixture, content", [
    pytest.param("3.0-closed", V1_CLOSED_CONTENT, id="3.0-closed"),
    pytest.param("3.1-closed", V1_CLOSED_CONTENT, id="3.1-closed"),
    pytest.param("3.1-crashed", V1_CRASHED_CONTENT, id="3.1-crashed"),
])
def test_a_store_written_by_version_3_is_converted_at_first_open_with_no_warning(
        path, caplog, fixture, content):
    # fixtures/store-3.0-closed.{dat,idx}: written by commit 4db529a (3.0.0),
    # and store-3.1-*.{dat,idx} by commit 2b3d962 (3.1.0), with the calls
    # above, then closed or left as kill -9 leaves a store. Their records
    # start at 512-byte blocks, under another magic: the open gives each the
    # magic of this version, scans .dat, and says so at level INFO.
    for suffix in (".dat", ".idx"):
        shutil.copy(ROOT / "fixtures" / f"store-{fixture}{suffix}", f"{path}{suffix}")
    caplog.set_level(logging.INFO, logger="datastore")
    with DataStore(path) as s:
        assert live_content(s) == content
        assert s.check()["lost_keys"] == 0
        s.create("after", {"v": 2})
    assert "converted from version 3" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    data = Path(f"{path}.dat").read_bytes()
    assert data[:8] == b"DataStr4" and len(value_records(data)) == len(content) + 1
    with DataStore(path) as s:  # and closed by this version: trusted again
        assert live_content(s) == dict(content, after={"v": 2})
    assert Path(f"{path}.idx").read_bytes()[:8] == b"DSidx4\0\0"


def test_a_version_3_store_damaged_since_its_clean_close_says_so_when_converted(
        path, caplog):
    for suffix in (".dat", ".idx"):
        shutil.copy(ROOT / "fixtures" / f"store-3.1-closed{suffix}", f"{path}{suffix}")
    data = bytearray(Path(f"{path}.dat").read_bytes())
    data[data.index(b'{"i":4') + 3] ^= 1  # k4's value: its CRC no longer matches
    Path(f"{path}.dat").write_bytes(bytes(data))
    with DataStore(path) as s:
        assert live_content(s) == {k: v for k, v in V1_CLOSED_CONTENT.items() if k != "k4"}
        with pytest.raises(CorruptStoreError, match="lost 1 key"):
            s.check()
    assert "converted from version 3" in caplog.text and "lost 1 key(s)" in caplog.text
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_a_store_short_only_of_room_for_its_free_map_opens_takes_deletes_and_closes(path):
    # 3.0.0 counted no free map in .idx: a store it filled to its cap needs a
    # byte a block of .dat more than that cap now. As such a store, one
    # filled under a cap larger by just that much, left by a crash.
    with DataStore(path, max_bytes=MIN_STORE_BYTES * 4) as s:
        count = fill(s, "k", size=100)
        used, blocks = counted_size(s), s._engine.dat_size // BLOCK + 1
        abandon(s)
    cap = used - blocks // 2
    with DataStore(path, max_bytes=cap) as s:
        assert len(s) == count and counted_size(s) > cap  # over it, by the map
        with pytest.raises(StoreFullError):
            s.create("more", {})
        s.delete("k00003")
        assert files_size(path) <= cap
    assert files_size(path) <= cap  # that close saved no snapshot: it did not fit
    with DataStore(path, max_bytes=cap) as s:  # read from .dat again
        assert len(s) == count - 1 and "k00003" not in s


def test_converting_a_1_0_store_never_takes_the_files_over_max_bytes(tmp_path, monkeypatch):
    path = tmp_path / "store"
    for suffix in (".dat", ".dir"):
        shutil.copy(ROOT / "fixtures" / f"store-1.0-closed{suffix}", f"{path}{suffix}")
    cap = 64 * 1024
    with open(f"{path}.dir", "a") as f:  # as a long-lived 1.0 store's index grows
        i = 0
        while files_size(path) < cap - 100:  # just under its cap
            f.write(f"'old{i:05d}', ({i * 512}, 40)\n")
            f.flush()
            i += 1
    peak = []
    for name in ("pwrite", "write", "ftruncate"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, real=real: (real(*a), peak.append(
            files_size(path)))[0])
    with DataStore(path, max_bytes=cap) as s:
        assert len(s) == 12
    monkeypatch.undo()
    assert peak and max(peak) <= cap
    assert files_size(path) <= cap


# --- Memory ---------------------------------------------------------------

def test_an_open_store_holds_a_few_bytes_a_key_in_memory(tmp_path):
    count = 20_000
    with DataStore(tmp_path / "ours") as s:
        for i in range(count):
            s.create(f"key{i:08d}", {"i": i}, ttl=3600 if i % 2 else None)
    tracemalloc.start()
    try:
        store = DataStore(tmp_path / "ours")
        store.create("one more", {"v": 1}, ttl=60)  # and after writing, with a ttl
        assert store.read("key00000007") == {"i": 7}
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    store.close()
    # the expiries of the keys with a ttl: 16 bytes each; the index is mapped
    assert held / count <= 16, held / count


# --- Command line ---------------------------------------------------------

def cli(*args, env=None, module=False):
    """Run the command line of the form under test in a subprocess (python
    datastore.py, or python -m datastore: see cli_command); return (status,
    stdout, stderr)."""
    result = subprocess.run([*cli_command(module), *map(str, args)],
                            capture_output=True, text=True, timeout=60, cwd=CHILD_CWD,
                            env=child_env(**(env or {})))
    return result.returncode, result.stdout, result.stderr


def test_cli_creates_reads_and_deletes(path):
    assert cli("--path", path, "create", "k", '{"name": "Ada", "n": [1, 2]}') == (0, "", "")
    assert cli("--path", path, "read", "k") == (0, '{"name": "Ada", "n": [1, 2]}\n', "")
    assert cli("--path", path, "delete", "k") == (0, "", "")
    status, out, err = cli("--path", path, "read", "k")
    assert (status, out, err) == (1, "", "datastore: error: key 'k' not found\n")


def test_cli_create_with_ttl_expires(path, clock):
    assert cli("--path", path, "create", "k", "{}", "--ttl", "1")[0] == 0
    with DataStore(path) as s:
        assert s.read("k") == {}
        clock.now = time.time()  # the create ran in another process, since
        s._clock = clock
        clock.advance(1)
        with pytest.raises(KeyNotFoundError):
            s.read("k")


def test_python_dash_m_datastore_works_the_same(path):
    assert cli("--path", path, "create", "k", '{"a": "é"}', module=True)[0] == 0
    assert cli("--path", path, "read", "k", module=True) == (0, '{"a": "é"}\n', "")


@pytest.mark.parametrize("args, message", [
    pytest.param(["create", "k", "not json"], "JSON for 'k' is not valid", id="not-json"),
    pytest.param(["create", "k", "[1, 2]"], "must be a dict, not list", id="a-list"),
    pytest.param(["create", "k", "{}", "--ttl", "0"], "must be positive", id="ttl-0"),
    pytest.param(["create", "x" * 33, "{}"], "1 to 32 characters", id="long-key"),
    pytest.param(["create", "k", '{"n": NaN}'], "not plain JSON", id="nan"),
    pytest.param(["delete", "missing"], "not found", id="missing-key"),
    pytest.param(["ttl", "missing"], "not found", id="ttl-missing-key"),
])
def test_cli_errors_are_one_line_on_stderr_with_status_1(path, args, message):
    status, out, err = cli("--path", path, *args)
    assert status == 1 and out == ""
    assert err.startswith("datastore: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("args", [
    pytest.param([], id="no-command"), pytest.param(["frobnicate"], id="unknown-command"),
    pytest.param(["read"], id="no-key"), pytest.param(["create", "k"], id="no-json"),
    pytest.param(["create", "k", "{}", "--ttl", "soon"], id="ttl-not-a-number"),
    pytest.param(["export", "a", "b"], id="export-two-files"),
    pytest.param(["import", "--merge"], id="import-unknown-option"),
])
def test_cli_usage_errors_exit_with_status_2(path, args):
    status, out, err = cli("--path", path, *args)
    assert status == 2 and "usage:" in err and "Traceback" not in err


@POSIX_ONLY
def test_cli_says_when_another_process_holds_the_store(path, holder):
    status, _, err = cli("--path", path, "read", "held")
    assert status == 1
    assert err == (f"datastore: error: store {path} is in use by another process; "
                   "only one process at a time may open it\n")


def test_cli_without_path_uses_the_default_store(tmp_path):
    env = {"XDG_DATA_HOME": str(tmp_path)}
    assert cli("create", "k", '{"v": 1}', env=env)[0] == 0
    with DataStore(tmp_path / "datastore" / "default") as s:
        assert s.read("k") == {"v": 1}


def test_cli_set_keys_and_ttl(path):
    assert cli("--path", path, "set", "k", '{"v": 1}') == (0, "", "")
    assert cli("--path", path, "set", "k", '{"v": 2}', "--ttl", "3600") == (0, "", "")
    assert cli("--path", path, "create", "a\nb", "{}") == (0, "", "")  # a key with a newline
    assert cli("--path", path, "read", "k") == (0, '{"v": 2}\n', "")
    status, out, _ = cli("--path", path, "ttl", "k")
    assert status == 0 and 3590 < float(out) <= 3600
    assert cli("--path", path, "ttl", "a\nb") == (0, "null\n", "")
    assert cli("--path", path, "keys") == (0, "a\nb\nk\n", "")
    assert cli("--path", path, "keys", "--json") == (0, '["a\\nb", "k"]\n', "")


def test_cli_reads_the_json_from_standard_input_for_a_dash(path):
    result = subprocess.run([*cli_command(), "--path", str(path), "set", "k", "-"],
                            input='{"from": "stdin", "é": 1}', cwd=CHILD_CWD, env=child_env(),
                            capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert result.returncode == 0, result.stderr
    assert cli("--path", path, "read", "k") == (0, '{"from": "stdin", "é": 1}\n', "")


@pytest.mark.parametrize("stdin, message", [
    pytest.param(b'{"name": "\xe9"}', "not valid", id="latin-1"),  # not taken as é
    pytest.param(b'{"a": 1', "not valid", id="cut-short"),
    pytest.param(None, "no standard input", id="closed"),
])
def test_cli_bad_standard_input_is_a_one_line_error(path, stdin, message):
    command = [*cli_command(), "--path", str(path), "set", "k", "-"]
    if stdin is None:  # run with standard input closed, as `<&-` does
        if command[1] == "-m":  # python -m datastore ...
            command[1:3] = ["-c", "import sys, runpy; sys.stdin.close(); sys.stdin = None; "
                            "sys.argv = sys.argv[1:]; "
                            "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)",
                            "datastore"]
        else:  # python datastore.py ...
            command[1:1] = ["-c", "import sys, runpy; sys.stdin.close(); sys.stdin = None; "
                            "sys.argv = sys.argv[1:]; "
                            "runpy.run_path(sys.argv[0], run_name='__main__')"]
    result = subprocess.run(command, input=stdin, capture_output=True, timeout=60,
                            cwd=CHILD_CWD, env=child_env())
    err = result.stderr.decode()
    assert result.returncode == 1 and message in err and err.count("\n") == 1, err
    assert cli("--path", path, "keys") == (0, "", "")


@POSIX_ONLY
@pytest.mark.parametrize("keys", [1, 3000])  # 96 KB of keys: more than a pipe holds
def test_cli_output_to_a_reader_that_left_ends_quietly(path, keys):
    with DataStore(path) as s:
        for i in range(keys):
            s.create(f"{i:031d}", {})
    env = {name: value for name, value in child_env().items() if name != "PYTHONUNBUFFERED"}
    proc = subprocess.Popen([*cli_command(), "--path", str(path), "keys"], cwd=CHILD_CWD,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # as `| head -0` does
    with proc.stderr:
        err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1 and err == b"", err


def test_cli_version_and_empty_keys(path):
    assert cli("--version") == (0, f"datastore {datastore.__version__}\n", "")
    assert cli("--path", path, "keys") == (0, "", "")
    assert cli("--path", path, "keys", "--json") == (0, "[]\n", "")


@POSIX_ONLY
def test_cli_timeout_waits_for_the_holder(path, holder):
    close_later(holder, 0.5)
    assert cli("--path", path, "--timeout", "30", "read", "held") == (
        0, '{"by": "holder"}\n', "")


def test_cli_errors_for_deep_json_and_unprintable_output_are_one_line(path):
    deep = '{"a":' * 5000 + "1" + "}" * 5000
    status, out, err = cli("--path", path, "create", "deep", deep)
    assert status == 1 and err.count("\n") == 1  # json's own limit, or ours
    assert "not valid" in err or "nested more than 100 levels" in err
    assert cli("--path", path, "create", "é", '{"é": 1}')[0] == 0
    for args in (["read", "é"], ["keys"]):
        status, out, err = cli("--path", path, *args, env={"PYTHONIOENCODING": "ascii"})
        assert status == 1 and "PYTHONIOENCODING=utf-8" in err and err.count("\n") == 1


# The command line's export and import: JSON Lines, one live key a line.

def cli_bytes(*args, stdin=b"", env=None):
    """cli() with bytes in and out: export writes, and import reads, UTF-8
    whatever the locale says. Returns (status, stdout bytes, stderr)."""
    result = subprocess.run([*cli_command(), *map(str, args)], input=stdin,
                            capture_output=True, timeout=60, cwd=CHILD_CWD,
                            env=child_env(**(env or {})))
    return result.returncode, result.stdout, result.stderr.decode()


def export_line(key, value, expires_at=None):
    """One line as export writes it."""
    return json.dumps({"key": key, "value": value, "expires_at": expires_at},
                      ensure_ascii=False, separators=(",", ":")) + "\n"


def contents(path):
    """Key -> (value, the Unix time it expires at or None), read through the
    public interface in this process."""
    with DataStore(path) as s:
        found = {}
        for key in s.keys():
            left = s.ttl(key)
            found[key] = (s.read(key), None if left is None else time.time() + left)
        return found


UNUSUAL_KEYS = ['say "hi"', "two\nlines", "back\\slash\ttab", "日本語 🙂", "é",
                "sep\u2028arator", '{"key":"x"}', "x" * 32, " ", "\0"]


def test_cli_export_then_import_round_trips_keys_values_and_expiries(tmp_path):
    source, copy, file = tmp_path / "source", tmp_path / "copy", tmp_path / "export.jsonl"
    with DataStore(source) as s:
        for i, key in enumerate(UNUSUAL_KEYS):
            s.create(key, {"i": i, "key": key, "deep": {"list": [1, "二", None, 2.5]}},
                     ttl=(None, 3600, 86400 * 365)[i % 3])
    before = contents(source)
    assert cli("--path", source, "export", file) == (0, "", "")
    lines = file.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) == len(UNUSUAL_KEYS) + 1
    assert [json.loads(line)["key"] for line in lines[:-1]] == sorted(UNUSUAL_KEYS)
    assert cli("--path", copy, "import", file) == (0, f"imported {len(UNUSUAL_KEYS)} keys\n", "")
    after = contents(copy)
    assert {key: value for key, (value, _) in after.items()} == {
        key: value for key, (value, _) in before.items()}
    assert sum(expires_at is None for _, expires_at in before.values()) == 4
    for key, (_, expires_at) in before.items():
        if expires_at is None:
            assert after[key][1] is None, key
        else:  # whole seconds, rounded up: never earlier, under a second later
            assert expires_at - 0.01 <= after[key][1] <= expires_at + 1.01, key


def test_cli_export_writes_sorted_compact_utf_8_lines_to_standard_output(path):
    with DataStore(path) as s:
        s.create("b", {"n": [1, 2], "s": "a b"})
        s.create("é", {"ü": "\u2028"}, ttl=3600)
        s.create("a", {})
        expires_at = time.time() + s.ttl("é")
    for dash in ([], ["-"]):  # UTF-8 even where the locale says ASCII
        status, out, err = cli_bytes("--path", path, "export", *dash,
                                     env={"PYTHONIOENCODING": "ascii"})
        assert (status, err) == (0, "")
        first, second, third, end = out.split(b"\n")
        assert first == b'{"key":"a","value":{},"expires_at":null}'
        assert second == b'{"key":"b","value":{"n":[1,2],"s":"a b"},"expires_at":null}'
        assert third.startswith('{"key":"é","value":{"ü":"\u2028"},"expires_at":'.encode())
        assert abs(json.loads(third)["expires_at"] - expires_at) < 0.01 and end == b""


def test_cli_export_to_a_file_replaces_it_whole_private_to_you(path, tmp_path):
    make_store(path, 3)
    file, link = tmp_path / "export.jsonl", tmp_path / "link.jsonl"
    file.write_text("old content\n")
    os.symlink(file.name, link)
    assert cli("--path", path, "export", link) == (0, "", "")
    assert link.is_symlink()  # the file it names was replaced, not the link
    assert file.read_bytes() == cli_bytes("--path", path, "export")[1]
    assert [json.loads(line)["value"] for line in file.read_text().splitlines()] == [
        {"i": 0}, {"i": 1}, {"i": 2}]
    assert file.stat().st_mode & 0o777 == 0o600  # as the store's own files
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "export.jsonl", "link.jsonl", "store.dat", "store.idx", "store.lock"]


def test_cli_export_that_fails_leaves_the_old_file_and_no_temporary_one(path, tmp_path):
    make_store(path, 3)
    dat = Path(f"{path}.dat")
    data = bytearray(dat.read_bytes())
    data[data.index(b'{"i":1}') + 5] ^= 0x01  # damage k1: reading it fails, after k0
    dat.write_bytes(bytes(data))
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    old.write_text("old content\n")
    for file in (old, new):
        status, out, err = cli("--path", path, "export", file)
        assert (status, out) == (1, "") and "'k1'" in err and err.count("\n") == 1, err
    assert old.read_text() == "old content\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "old.jsonl", "store.dat", "store.idx", "store.lock"]


def test_cli_export_of_an_empty_store_prints_nothing(path, tmp_path):
    assert cli("--path", path, "export") == (0, "", "")
    assert cli("--path", path, "export", tmp_path / "empty.jsonl") == (0, "", "")
    assert (tmp_path / "empty.jsonl").read_bytes() == b""
    assert cli("--path", tmp_path / "copy", "import", tmp_path / "empty.jsonl") == (
        0, "imported 0 keys\n", "")


@POSIX_ONLY
def test_cli_export_writes_into_a_pipe_and_never_over_the_stores_files(path, tmp_path):
    make_store(path, 2)
    fifo = tmp_path / "fifo"  # as /dev/stdout or bash's >(gzip > file) would be
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so the writer need not wait
    try:
        assert cli("--path", path, "export", fifo) == (0, "", "")
        assert fifo.is_fifo()  # written into, not renamed over
        assert os.read(reader, 65536) == cli_bytes("--path", path, "export")[1]
    finally:
        os.close(reader)
    os.symlink(f"{path}.dat", tmp_path / "sneaky.jsonl")
    for target in (f"{path}.dat", f"{path}.idx", f"{path}.lock", tmp_path / "sneaky.jsonl"):
        status, out, err = cli("--path", path, "export", target)
        assert (status, out) == (1, "") and "one of the store's own files" in err, target
    assert contents(path) == {"k0": ({"i": 0}, None), "k1": ({"i": 1}, None)}


def test_cli_import_of_a_live_key_fails_and_changes_nothing_unless_replace(path, tmp_path):
    with DataStore(path) as s:
        s.create("b", {"old": True}, ttl=3600)
    file = tmp_path / "in.jsonl"
    file.write_text(export_line("a", {"new": 1}) + export_line("b", {"new": 2})
                    + export_line("c", {"new": 3}), encoding="utf-8")
    before = contents(path)
    assert cli("--path", path, "import", file) == (
        1, "", "datastore: error: line 2: key 'b' already exists; use --replace to "
        "overwrite live keys; nothing imported\n")
    after = contents(path)
    assert after.keys() == before.keys() and after["b"][0] == before["b"][0]
    assert abs(after["b"][1] - before["b"][1]) < 0.01  # the same ttl
    assert cli("--path", path, "import", file, "--replace") == (0, "imported 3 keys\n", "")
    assert contents(path) == {"a": ({"new": 1}, None), "b": ({"new": 2}, None),
                              "c": ({"new": 3}, None)}  # b's ttl went with its old value


@pytest.mark.parametrize("line, message", [
    pytest.param(b"not json", "not valid JSON", id="not-json"),
    pytest.param(b'["k", {}, null]', "not a JSON object", id="an-array"),
    pytest.param(b'{"key": "k", "value": {}}', "(no 'expires_at')", id="no-expires-at"),
    pytest.param(b'{"key": "k", "value": {}, "expires_at": null, "ttl": 5}',
                 "(unexpected 'ttl')", id="an-extra-field"),
    pytest.param(b'{"key": 7, "value": {}, "expires_at": null}', "must be a str, not int",
                 id="key-not-a-str"),
    pytest.param(b'{"key": "%s", "value": {}, "expires_at": null}' % (b"x" * 33),
                 "1 to 32 characters", id="key-too-long"),
    pytest.param(b'{"key": "k", "value": [1], "expires_at": null}', "must be a dict, not list",
                 id="value-not-a-dict"),
    pytest.param(b'{"key": "k", "value": {"n": NaN}, "expires_at": null}', "not plain JSON",
                 id="nan-in-value"),
    pytest.param(b'{"key": "k", "value": {"s": "%s"}, "expires_at": null}' % (b"x" * 16400),
                 "the limit is 16384", id="value-too-large"),
    pytest.param(b'{"key": "k", "value": {}, "expires_at": "soon"}',
                 "must be null or a number of seconds", id="expires-at-a-str"),
    pytest.param(b'{"key": "k", "value": {}, "expires_at": true}',
                 "must be null or a number of seconds", id="expires-at-a-bool"),
    pytest.param(b'{"key": "k", "value": {}, "expires_at": Infinity}', "must be finite",
                 id="expires-at-infinite"),
    pytest.param(b'{"key": "k", "value": {}, "expires_at": 1e300}', "past the year 9999",
                 id="expires-after-9999"),
    pytest.param(b'{"key": "one", "value": {}, "expires_at": null}', "already on line 1",
                 id="a-key-twice"),
    pytest.param(b'{"key": "\xe9", "value": {}, "expires_at": null}', "not UTF-8",
                 id="latin-1"),
])
def test_cli_import_with_a_bad_line_3_of_5_writes_nothing_and_names_it(path, line, message):
    make_store(path, 1)
    lines = [export_line("one", {}).encode(), export_line("two", {}, time.time() + 60).encode(),
             line + b"\n", export_line("four", {}).encode(), export_line("five", {}).encode()]
    for replace in ([], ["--replace"]):
        status, out, err = cli_bytes("--path", path, "import", *replace, stdin=b"".join(lines))
        assert (status, out) == (1, b"") and err.count("\n") == 1, err
        assert err.startswith("datastore: error: line 3: ") and message in err, err
        assert err.endswith("; nothing imported\n"), err
    assert contents(path) == {"k0": ({"i": 0}, None)}


def test_cli_import_skips_expired_and_blank_lines_and_counts_them(path):
    with DataStore(path) as s:
        s.create("stale", {"kept": True})
    now = time.time()
    data = (export_line("gone", {}, now - 10) + "\n   \n"
            + export_line("later", {"v": 1}, now + 100.5).replace("\n", "\r\n")
            + export_line("stale", {"new": True}, now - 1) + export_line("forever", {"v": 2}))
    assert cli_bytes("--path", path, "import", "-", "--replace", stdin=data.encode()) == (
        0, b"imported 2 keys (2 expired, skipped)\n", "")
    found = contents(path)
    assert sorted(found) == ["forever", "later", "stale"]  # no "gone"
    assert found["stale"] == ({"kept": True}, None)  # an expired line leaves the key alone
    assert found["forever"] == ({"v": 2}, None)
    assert found["later"][0] == {"v": 1}
    assert now + 100.5 - 0.01 <= found["later"][1] <= now + 101.5 + 0.01


def test_cli_import_that_fills_the_disk_stops_at_that_line_and_says_how_far(small_disk):
    path = small_disk / "store"  # max_bytes is the default: the 320 KiB disk fills first
    (small_disk / "spare").write_bytes(bytes(16384))
    data = "".join(export_line(f"k{i:02}", {"pad": "x" * 10000}) for i in range(60))
    status, out, err = cli_bytes("--path", path, "import", stdin=data.encode())
    assert (status, out) == (1, b"") and err.count("\n") == 1, err
    # (the close after the failed line found the disk full too: the next open
    # scans .dat; room for the index that close writes)
    (small_disk / "spare").unlink()
    match = re.fullmatch(r"datastore: error: line (\d+): .*No space left on device.*; "
                         r"the lines before it stay imported \((\d+) keys?\)\n", err)
    assert match, err
    failed, imported = int(match[1]), int(match[2])
    assert failed == imported + 1 and 5 < imported < 60
    assert sorted(contents(path)) == [f"k{i:02}" for i in range(imported)]


# --- README, docstring and sample -----------------------------------------

def readme_blocks(kind):
    return re.findall(rf"```{kind}\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def run_doctest(text, globs, name):
    test = doctest.DocTestParser().get_doctest(text, globs, name, name, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    return runner.tries, runner.failures


def test_readme_examples_pass_python_m_doctest_again_and_again(tmp_path):
    """python -m doctest README.md against the form under test: twice where a
    child imports it (the project folder, for the copy-in file), then in an
    empty folder."""
    folders = sorted({ROOT, CHILD_CWD})
    before = [sorted(p.name for p in folder.iterdir()) for folder in folders]
    home = tmp_path / "home"
    home.mkdir()
    env = child_env(HOME=str(home), XDG_DATA_HOME=str(home / "xdg"))
    env.pop("DATASTORE_PATH", None)
    here = "README.md" if CHILD_CWD == ROOT else ROOT / "README.md"
    for cwd, readme in ((CHILD_CWD, here), (CHILD_CWD, here), (tmp_path, ROOT / "README.md")):
        result = subprocess.run([sys.executable, "-m", "doctest", str(readme)], cwd=cwd,
                                env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    assert len(readme_blocks("pycon")) == 2
    after = [sorted(p.name for p in folder.iterdir()) for folder in folders]
    assert after == before  # nothing left behind
    assert list(home.iterdir()) == []  # nor in the user's data folder


def test_readme_shell_examples_run(tmp_path):
    """The README's `python datastore.py ...` lines, run where the copy-in file
    was copied: that file in either form, by design."""
    shutil.copy(ROOT / "datastore.py", tmp_path)
    blocks = [block for block in readme_blocks("console") if block.startswith("$ ")]
    assert blocks
    for block in blocks:
        expected, got = [], []
        for line in block.splitlines():
            if not line.startswith("$ "):
                expected.append(line)
                continue
            command = re.sub(r"(^|\| )python ", rf"\g<1>{sys.executable} ", line[2:])
            result = subprocess.run(["bash", "-c", command], cwd=tmp_path, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    timeout=60)
            got.extend(result.stdout.splitlines())
        assert got == expected


def test_module_docstring_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tries, failures = run_doctest(datastore.__doc__, {}, "datastore")  # as written
    assert tries == 3 and failures == 0
    assert list(tmp_path.iterdir()) == []  # it cleans up after itself


@SLOW
def test_sample_runs_again_and_again_with_the_same_result():
    """python sample.py in the project folder, as the README says: it imports
    the copy-in datastore.py beside it, in either form (its own folder comes
    first on sys.path), and runs the file it imported as the command line,
    which the package's __init__.py cannot be."""
    outputs = []
    for _ in range(2):
        result = subprocess.run([sys.executable, str(ROOT / "sample.py")], cwd=ROOT,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stderr == ""
        # The temporary folder's name differs from run to run; nothing else may.
        folder = re.search(r"The store lives at (.+)/tour ", result.stdout).group(1)
        outputs.append(result.stdout.replace(folder, "FOLDER"))
    assert outputs[0] == outputs[1]
    for shown in ("KeyExistsError", "KeyNotFoundError: key 'session' not found",
                  "InvalidKeyError", "InvalidValueError", "in use by another process",
                  "The store lives at"):
        assert shown in outputs[0]


# --- The benchmark script -------------------------------------------------

@pytest.mark.parametrize("peers", [pytest.param("as installed", id="as-installed"),
                                   pytest.param("missing", id="missing")])
@SLOW
def test_benchmark_runs_and_skips_missing_peers_with_a_hint(peers):
    """python benchmark.py --quick in the project folder: like sample.py, it
    imports the copy-in datastore.py beside it, in either form (it times the
    private _encode_value, which only that file has at its top level)."""
    # Blocking a module in sys.modules makes importing it raise ImportError.
    block = ("import sys; sys.modules['diskcache'] = sys.modules['sqlitedict'] = None; "
             if peers == "missing" else "import sys; ")
    # (Without the peers, only the section that times them: the cap's ttl
    # runs wait for keys to expire, most of this test's 20 seconds.)
    sections = "compare" if peers == "missing" else "compare,cap,capacity"
    code = (block + "sys.argv = ['benchmark.py', '--quick', '--n', '300', '--rounds', '1', "
            f"'--sizes', '100,300', '--sections', '{sections}', "
            "'--capacity-bytes', '262144']; import runpy; runpy.run_path('benchmark.py', "
            "run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "| DataStore |" in result.stdout and "| shelve (dbm.dumb) |" in result.stdout
    assert "| floor (pure Python) |" in result.stdout and "| sqlite3 |" in result.stdout
    assert "DataStore / the pure-Python floor at 300 keys: create" in result.stdout
    assert "DataStore / sqlite3 at 300 keys, as issue 16 asks besides: create" in result.stdout
    assert "300 keys against 100" in result.stdout
    if peers == "missing":
        assert "skipping diskcache: python -m pip install diskcache" in result.stderr
        assert "skipping sqlitedict: python -m pip install sqlitedict" in result.stderr
        assert "| diskcache |" not in result.stdout
        return
    assert "### At the cap" in result.stdout
    capacity = re.findall(r"^\| (\{\}|150 B|1 KiB|4 KiB) \| ([\d,]+) \| ([\d,]+) \|",
                          result.stdout, re.M)
    assert [name for name, _, _ in capacity] == ["{}", "150 B", "1 KiB", "4 KiB"]
    assert all(int(ours.replace(",", "")) > 0 and int(theirs.replace(",", "")) > 0
               for _, ours, theirs in capacity)

