"""Which form of datastore the test session imports, and the shared fixtures.

datastore exists in two forms: the package in src/datastore, and the
copy-in file datastore.py that tools/single_file.py generates from it. The
environment variable DATASTORE_FORM chooses one for the whole session:

    python -m pytest -q                                  # package (default):
                                                         # test_datastore.py and tests/
    DATASTORE_FORM=file python -m pytest -q test_datastore.py   # the copy-in file

This file imports it before any test module does (so their `import
datastore` finds it in sys.modules), and checks that the file imported is
the one meant. Child processes get the same form through tests/support.py
(PYTHONPATH, and a working directory that does not shadow it).

test_datastore.py, the user-level contract, runs in both forms; tests/, the
white-box tests, import the package's modules and run in the package form
only.
"""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
FORMS = {  # form -> (the folder put first on sys.path, the file it must import)
    "package": (ROOT / "src", ROOT / "src" / "datastore" / "__init__.py"),
    "file": (ROOT, ROOT / "datastore.py"),
}
FORM = os.environ.get("DATASTORE_FORM", "package")
if FORM not in FORMS:
    raise pytest.UsageError(f"DATASTORE_FORM must be one of {sorted(FORMS)}, not {FORM!r}")
SOURCE, EXPECTED = FORMS[FORM]

sys.path.insert(0, str(SOURCE))
import datastore  # noqa: E402  (after sys.path is set: this is the choice)

assert Path(datastore.__file__).resolve() == EXPECTED, (
    f"DATASTORE_FORM={FORM} should import {EXPECTED}, but `import datastore` found "
    f"{datastore.__file__} (was datastore imported before conftest.py, or installed?)")

if FORM != "package":
    collect_ignore = ["tests"]  # white-box: they import the package's modules

pytest.register_assert_rewrite("tests.support")  # its asserts explain themselves too
from tests.support import HOLDER, Clock, expect_line, spawn_python  # noqa: E402


@pytest.fixture
def path(tmp_path):
    return tmp_path / "store"


@pytest.fixture
def store(path):
    with datastore.DataStore(path) as s:
        yield s


@pytest.fixture
def clock():
    """A clock to give a store (store._clock = clock), moved by hand."""
    return Clock()


@pytest.fixture
def holder(path):
    """Another process that holds the store open until the test ends."""
    proc = spawn_python(HOLDER, path)
    expect_line(proc, "ready")
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=10)
    proc.stdout.close(), proc.stderr.close(), proc.stdin.close()


@pytest.fixture
def fresh_default(monkeypatch):
    """Make the module-level functions open a new default store (where the
    environment then says), then close it. Public calls only: close() closes
    the default store, and the next call opens it again."""
    datastore.close()
    monkeypatch.delenv("DATASTORE_PATH", raising=False)
    yield
    datastore.close()
