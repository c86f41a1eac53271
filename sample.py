"""A tour of datastore: every operation and every kind of error, in one run.

    python sample.py

The tour works in a fresh temporary folder, so it can run again and again
with the same result, and leaves nothing behind.
"""

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datastore
from datastore import DataStore, DataStoreError


def step(title, action):
    """Run one action and print what came of it: a result or an error."""
    try:
        result = action()
    except DataStoreError as exc:
        print(f"  {title:<40} -> {type(exc).__name__}: {exc}")
    else:
        print(f"  {title:<40} -> {'ok' if result is None else result}")


def main():
    with tempfile.TemporaryDirectory() as folder:
        with DataStore(Path(folder) / "tour") as store:
            print(f"The store lives at {store.path} (.dat, .dir and .lock)\n")

            print("Create, read, delete:")
            step("create 'ada'", lambda: store.create(
                "ada", {"name": "Ada Lovelace", "born": 1815}))
            step("read 'ada'", lambda: store.read("ada"))
            step("create 'ada' again", lambda: store.create("ada", {"name": "?"}))
            step("delete 'ada'", lambda: store.delete("ada"))
            step("read 'ada'", lambda: store.read("ada"))

            print("\nA time to live:")
            step("create 'session' with ttl=1", lambda: store.create(
                "session", {"user": "ada"}, ttl=1))
            step("read 'session'", lambda: store.read("session"))
            print("  ... waiting 1.1 seconds ...")
            time.sleep(1.1)
            step("read 'session'", lambda: store.read("session"))
            step("create 'session' again", lambda: store.create(
                "session", {"user": "grace"}, ttl=60))
            step("seconds 'session' has left", lambda: round(store.ttl("session")))

            print("\nOverwrite, look up, count and list:")
            step("set 'counter' (new)", lambda: store.set("counter", {"n": 1}))
            step("set 'counter' (over the old value)", lambda: store.set("counter", {"n": 2}))
            step("read 'counter'", lambda: store.read("counter"))
            step("get 'missing' with a default", lambda: store.get("missing", {"n": 0}))
            step("'counter' in store", lambda: "counter" in store)
            step("'missing' in store", lambda: "missing" in store)
            step("len(store)", lambda: len(store))
            step("sorted(store.keys())", lambda: sorted(store.keys()))

            print("\nBad input is refused, and nothing is written:")
            step("create a 33-character key", lambda: store.create("k" * 33, {}))
            step("create a value of 20,000 bytes", lambda: store.create(
                "big", {"text": "x" * 20_000}))
            step("create a list instead of a dict", lambda: store.create("list", [1, 2]))
            step("create with ttl=0", lambda: store.create("t", {}, ttl=0))

            print("\nOne process at a time: another process tries to read:")
            other = subprocess.run(
                [sys.executable, datastore.__file__, "--path", str(store.path),
                 "read", "session"], capture_output=True, text=True)
            print(f"  exit status {other.returncode}: {other.stderr.strip()}")

        print("\nClosed, and opened again from the shell (python datastore.py ...):")
        for args in (["read", "session"], ["create", "note", '{"text": "from the shell"}'],
                     ["read", "note"], ["read", "ada"], ["keys"]):
            shell = subprocess.run(
                [sys.executable, datastore.__file__, "--path", str(store.path), *args],
                capture_output=True, text=True)
            output = (shell.stdout or shell.stderr).strip().replace("\n", " ") or "(no output)"
            print(f"  {' '.join(args):<40} -> exit {shell.returncode}: {output}")

if __name__ == "__main__":
    main()
