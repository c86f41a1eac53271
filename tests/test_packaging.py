"""The two forms datastore ships in, and how they are built and installed.

The package in src/datastore is the source; datastore.py, the file people
copy in, is generated from it by tools/single_file.py and committed. The
contract (test_datastore.py) passes against both; `pip install .` gives a
typed package and a `datastore` command.
"""

import ast
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "datastore"
SLOW = pytest.mark.slow
pytestmark = pytest.mark.skipif(os.environ.get("DATASTORE_FORM", "package") != "package",
                                reason="checks the package and the build, not one form")


def run(command, cwd, timeout=300, **env):
    return subprocess.run([str(part) for part in command], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, **env))


# --- The copy-in file -------------------------------------------------------

def test_the_copy_in_file_is_what_the_script_generates():
    result = run([sys.executable, ROOT / "tools" / "single_file.py", "--check"], ROOT)
    assert result.returncode == 0, result.stderr


def test_the_check_fails_when_a_module_changed_after_generating(tmp_path):
    for part in ("src", "tools"):
        shutil.copytree(ROOT / part, tmp_path / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "datastore.py", tmp_path)
    script = tmp_path / "tools" / "single_file.py"
    assert run([sys.executable, script, "--check"], tmp_path).returncode == 0
    codec = tmp_path / "src" / "datastore" / "codec.py"
    codec.write_text(codec.read_text().replace("MAX_KEY_LENGTH = 32", "MAX_KEY_LENGTH = 33"))
    stale = run([sys.executable, script, "--check"], tmp_path)
    assert stale.returncode == 1
    assert "datastore.py is stale: run python tools/single_file.py" in stale.stderr
    assert run([sys.executable, script], tmp_path).returncode == 0
    assert "MAX_KEY_LENGTH = 33" in (tmp_path / "datastore.py").read_text()
    assert run([sys.executable, script, "--check"], tmp_path).returncode == 0


@pytest.mark.parametrize("change, error", [
    pytest.param(("space.py", "class _FreeSpace:", "def _log() -> None:\n    pass\n\n\n"
                  "class _FreeSpace:"),
                 "_log is defined in both errors and space", id="a-name-twice"),
    pytest.param(("codec.py", "def _expiry(", "_SEEN = set()\n\n\ndef _expiry("),
                 "codec uses set, which is store's set() in the one file", id="set"),
    pytest.param(("compaction.py", "_SWEEP_BATCH = 1024", "_FIELDS, _unused = 0, 1\n_SWEEP_BATCH = 1024"),
                 "_FIELDS is defined in both format and compaction", id="a-tuple-target"),
    pytest.param(("compaction.py", "from typing import TYPE_CHECKING, Optional\n",
                  "from typing import TYPE_CHECKING, Optional\n"
                  "from struct import pack as _blocks\n"),
                 "compaction imports _blocks from struct.pack, which the one file binds "
                 "otherwise (format)", id="an-import-as"),
    pytest.param(("errors.py", "import logging\n",
                  "import logging\n\nfrom .store import DataStore\n"),
                 "errors imports ['store'], which come after it", id="import-order"),
])
def test_the_script_refuses_modules_that_cannot_share_one_namespace(tmp_path, change, error):
    for part in ("src", "tools"):
        shutil.copytree(ROOT / part, tmp_path / part,
                        ignore=shutil.ignore_patterns("__pycache__"))
    name, old, new = change
    module = tmp_path / "src" / "datastore" / name
    assert old in module.read_text()
    module.write_text(module.read_text().replace(old, new, 1))
    result = run([sys.executable, tmp_path / "tools" / "single_file.py"], tmp_path)
    assert result.returncode == 1 and error in result.stderr
    assert not (tmp_path / "datastore.py").exists()


def test_every_module_of_the_package_is_small_enough_to_read_alone():
    sizes = {path.name: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert {"engine.py", "format.py", "recovery.py", "store.py"} <= set(sizes)
    assert max(sizes.values()) <= 600, sizes


def test_each_module_starts_with_a_docstring_that_the_copy_in_file_keeps():
    joined = (ROOT / "datastore.py").read_text()
    for path in PACKAGE.glob("*.py"):
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc, path.name
        if path.stem not in ("__init__", "__main__"):
            assert f"# --- {path.name} " in joined
            assert "\n".join(f"# {line}".rstrip() for line in doc.splitlines()) in joined


@SLOW
def test_the_copy_in_file_passes_the_contract():
    # The benchmark script's own tests are not about the form of the module.
    result = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                  "-k", "not benchmark", "test_datastore.py"], ROOT, timeout=600,
                 DATASTORE_FORM="file")
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert re.search(r"\d+ passed", summary) and "failed" not in summary, summary


@pytest.mark.parametrize("form", ["package", "file"])
def test_import_star_leaves_the_builtin_set_alone(form):
    source = ROOT / "src" if form == "package" else ROOT
    code = ("from datastore import *; import datastore; "
            "assert set('ab') == {'a', 'b'}, set; "
            "assert 'set' not in datastore.__all__ and callable(datastore.set); "
            "print(datastore.__file__)")
    result = run([sys.executable, "-c", code], source, PYTHONPATH=source)
    assert result.returncode == 0, result.stderr
    expected = source / "datastore" / "__init__.py" if form == "package" else source / "datastore.py"
    assert Path(result.stdout.strip()).resolve() == expected


def test_an_error_pickled_by_one_form_loads_in_the_other():
    dump = ("import datastore, pickle, sys; sys.stdout.buffer.write(pickle.dumps("
            "datastore.KeyNotFoundError(\"key 'k' not found\", key='k', path='p')))")
    load = ("import datastore, pickle, sys; error = pickle.loads(sys.stdin.buffer.read()); "
            "assert type(error) is datastore.KeyNotFoundError, type(error); "
            "print(error.key, error.path, error, type(error).__module__)")
    for source, target in ((ROOT / "src", ROOT), (ROOT, ROOT / "src")):
        dumped = subprocess.run([sys.executable, "-c", dump], cwd=source, capture_output=True,
                                env=dict(os.environ, PYTHONPATH=str(source)), timeout=60)
        assert dumped.returncode == 0, dumped.stderr
        loaded = subprocess.run([sys.executable, "-c", load], cwd=target, input=dumped.stdout,
                                capture_output=True, env=dict(os.environ, PYTHONPATH=str(target)),
                                timeout=60)
        assert loaded.stdout == b"k p key 'k' not found datastore\n", loaded.stderr


# --- Installing -------------------------------------------------------------

MISUSE = """
    import datastore
    from datastore import DataStore

    store = DataStore("people")
    store.create(1, {"a": 1})
    store.create("k", [1])
    count: int = store.read("k")
    datastore.delete(b"k")
    store.ttl("k") + 1
"""


@SLOW
def test_pip_install_gives_a_typed_package_and_a_datastore_command(tmp_path):
    pytest.importorskip("mypy", reason="python -m pip install mypy")
    venv = tmp_path / "venv"
    assert run([sys.executable, "-m", "venv", venv], tmp_path).returncode == 0
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "*.dat", "*.dir", "*.lock", "__pycache__", "build", "*.egg-info"))
    install = run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                   source], tmp_path)
    assert install.returncode == 0, install.stderr
    where = run([python, "-c", "import datastore; print(datastore.__file__)"], tmp_path)
    installed = Path(where.stdout.strip()).parent
    assert "site-packages" in installed.parts, where.stdout + where.stderr
    # The very modules of src/datastore, and the marker that says they are typed.
    assert sorted(p.name for p in installed.glob("*.py")) == sorted(
        p.name for p in PACKAGE.glob("*.py"))
    for module in PACKAGE.glob("*.py"):
        assert (installed / module.name).read_bytes() == module.read_bytes(), module.name
    assert (installed / "py.typed").exists()

    version = run([bin_dir / "datastore", "--version"], tmp_path)
    init = (PACKAGE / "__init__.py").read_text()
    assert version.stdout == "datastore %s\n" % re.search(r'__version__ = "(.+)"', init)[1]
    store = tmp_path / "store"
    assert run([bin_dir / "datastore", "--path", store, "set", "k", '{"v": 1}'],
               tmp_path).returncode == 0
    read = run([python, "-m", "datastore", "--path", store, "read", "k"], tmp_path)
    assert read.stdout == '{"v": 1}\n', read.stderr

    user = tmp_path / "user.py"
    user.write_text(textwrap.dedent(MISUSE))
    checked = run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                   "--python-executable", python, user], tmp_path)
    assert "missing library stubs or py.typed marker" not in checked.stdout
    errors = re.findall(r"user\.py:(\d+): error: (.*)", checked.stdout)
    assert [int(line) for line, _ in errors] == [6, 7, 8, 9, 10], checked.stdout
    assert 'incompatible type "int"; expected "str"' in errors[0][1]
    assert 'incompatible type "list[int]"; expected "dict[str, Any]"' in errors[1][1]
    assert 'expression has type "dict[str, Any]", variable has type "int"' in errors[2][1]
    assert 'incompatible type "bytes"; expected "str"' in errors[3][1]
    assert 'Unsupported operand types for + ("None" and "int")' in errors[4][1]


@SLOW
@pytest.mark.parametrize("target", [pytest.param("src/datastore", id="package"),
                                    pytest.param("datastore.py", id="file")])
def test_both_forms_type_check_under_mypy_strict(target):
    pytest.importorskip("mypy", reason="python -m pip install mypy")
    result = run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", target], ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_version_and_the_names_have_one_source():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'version = {attr = "datastore.__version__"}' in pyproject
    assert 'dynamic = ["version"]' in pyproject and 'requires-python = ">=3.8"' in pyproject
    assert 'name = "datastore-kv"' in pyproject
    assert 'datastore = "datastore.cli:main"' in pyproject
    assert re.search(r'^__version__ = "\d+\.\d+\.\d+"$', (PACKAGE / "__init__.py").read_text(),
                     re.M)


def test_readme_setup_commands_are_the_ones_ci_runs():
    blocks = re.findall(r"```console\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks[0].splitlines() == [
        "python -m pip install -r requirements.txt && python sample.py",
        "python -m pytest -q"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-m pip install --quiet --disable-pip-version-check -r requirements.txt" in ci
    assert ci.rstrip().endswith("-m pytest -q")
