"""White-box tests of datastore.store, the facade: the default store behind
the module-level functions, and where it lives on each platform. What a user
sees of them (the functions, DATASTORE_PATH, XDG_DATA_HOME, the folder's
permissions) is in test_datastore.py.
"""

import sys

import pytest

import datastore
from datastore import StoreClosedError
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
