"""White-box tests of datastore.store, the facade: the default store behind
the module-level functions, and where it lives on each platform. What a user
sees of them (the functions, DATASTORE_PATH, XDG_DATA_HOME, the folder's
permissions) is in test_datastore.py.
"""

import os
import sys

import pytest

import datastore
from datastore import StoreClosedError, locks
from datastore import store as facade


def test_module_close_closes_the_default_store(tmp_path, monkeypatch, fresh_default):
    monkeypatch.setenv("DATASTORE_PATH", str(tmp_path / "store"))
    datastore.create("k", {"v": 1})
    store = facade._default_store
    datastore.close()
    with pytest.raises(StoreClosedError):
        store.read("k")
    assert datastore.read("k") == {"v": 1}  # opened again on the next call
    datastore.close()
    datastore.close()  # closing a closed default store does nothing


@pytest.mark.parametrize("variable, value, expected", [
    pytest.param("DATASTORE_PATH", "elsewhere/store", "elsewhere/store", id="datastore-path"),
    pytest.param("XDG_DATA_HOME", "xdg", "xdg/datastore/default", id="xdg-data-home"),
])
def test_module_functions_open_the_default_store_at_its_path(tmp_path, monkeypatch,
                                                             fresh_default, variable,
                                                             value, expected):
    monkeypatch.setenv(variable, str(tmp_path / value))
    datastore.set("a", {"v": 1})
    assert facade._default_store.path == tmp_path / expected


@pytest.mark.parametrize("platform, env, expected", [
    pytest.param("linux", {"XDG_DATA_HOME": "relative/ignored"},
                 ".local/share/datastore/default", id="linux"),
    pytest.param("darwin", {}, "Library/Application Support/datastore/default", id="macos"),
    pytest.param("win32", {"LOCALAPPDATA": "{home}/AppData/Local"},
                 "AppData/Local/datastore/default", id="windows"),
])
def test_default_path_per_platform(tmp_path, monkeypatch, platform, env, expected):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(home=tmp_path))
    monkeypatch.setattr(sys, "platform", platform)
    assert facade._default_path() == tmp_path / expected


# --- A write cut short: read the files again ---------------------------------

def interrupt_next_pwrite(monkeypatch):
    real = os.pwrite

    def once(*args):
        monkeypatch.setattr(os, "pwrite", real)
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "pwrite", once)


def test_the_call_after_a_write_cut_short_reads_the_files_again(tmp_path, monkeypatch, caplog):
    store = datastore.DataStore(tmp_path / "store")
    store.create("kept", {"v": 1})
    old = store._engine
    interrupt_next_pwrite(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        store.create("cut", {"v": 2})
    assert old.busy and store._engine is old
    assert store.read("kept") == {"v": 1}  # after reading the files again
    assert store._engine is not old and old.dat == -1 and not store._engine.busy
    assert "cut" not in store and "interrupted part-way" in caplog.text
    store.close()
    with datastore.DataStore(tmp_path / "store") as again:
        assert again.keys() == ["kept"]


def test_a_store_that_cannot_read_its_files_again_closes(tmp_path, monkeypatch):
    path = tmp_path / "store"
    store = datastore.DataStore(path)
    store.create("kept", {"v": 1})
    interrupt_next_pwrite(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        store.create("cut", {"v": 2})
    dat = tmp_path / "store.dat"
    dat.rename(tmp_path / "moved.dat")  # and a folder where .dat was
    dat.mkdir()
    with pytest.raises(datastore.CorruptStoreError, match="is a folder"):
        store.read("kept")
    with pytest.raises(StoreClosedError):
        store.read("kept")
    assert not locks._open_stores
    dat.rmdir()
    (tmp_path / "moved.dat").rename(dat)
    with datastore.DataStore(path) as again:  # nothing of the first one is held
        assert again.read("kept") == {"v": 1}


def test_the_module_functions_work_after_an_interrupted_close(tmp_path, monkeypatch,
                                                               fresh_default):
    monkeypatch.setenv("DATASTORE_PATH", str(tmp_path / "store"))
    datastore.create("k", {"v": 1})
    engine = facade._default_store._engine
    calls = []
    real = engine.close_files

    def second_cut_short():
        calls.append(1)
        if len(calls) == 2:  # close()'s own, after the engine's
            raise KeyboardInterrupt
        real()
    monkeypatch.setattr(engine, "close_files", second_cut_short)
    with pytest.raises(KeyboardInterrupt):
        datastore.close()
    store = facade._default_store
    assert store._closed and store._engine is engine  # cut short part-way
    assert datastore.read("k") == {"v": 1}  # the next call finishes it, then opens anew
    assert facade._default_store is not store and store._engine is None
    datastore.close()
