"""Time DataStore against the stores people would otherwise pick.

    python benchmark.py [--n N] [--value-bytes B] [--rounds R] [--sizes A,B]

For each system, in one run on one machine: microseconds per create, read
and delete (best of R rounds, each on a fresh store in a temporary folder),
the ratio to DataStore, disk bytes per key and Python memory per key
(tracemalloc, which sees Python objects, not SQLite's own C memory). Then
DataStore alone at two sizes, to show the cost per operation does not grow
with the number of keys.

The peers: shelve over dbm.dumb (always; its delete rewrites the whole index,
so only the first 500 deletes are timed), diskcache.Cache with add() for
create, and sqlitedict.SqliteDict(autocommit=True) storing JSON. diskcache
and sqlitedict are optional: `python -m pip install diskcache sqlitedict`.
Progress goes to stderr, the report (Markdown) to stdout.
"""

import argparse
import datetime
import dbm.dumb
import gc
import json
import os
import platform
import random
import shelve
import sys
import tempfile
import time
import tracemalloc

from datastore import DataStore

SHELVE_DELETES = 500  # each dbm.dumb delete rewrites the index: O(keys)


# --- The systems, behind one small interface --------------------------------

class DataStoreSystem:
    name = "DataStore"

    def __init__(self, folder):
        self.store = DataStore(os.path.join(folder, "store"))

    def create(self, key, value):
        self.store.create(key, value)

    def read(self, key):
        return self.store.read(key)

    def delete(self, key):
        self.store.delete(key)

    def close(self):
        self.store.close()


class ShelveSystem:
    name = "shelve (dbm.dumb)"

    def __init__(self, folder):
        self.shelf = shelve.Shelf(dbm.dumb.open(os.path.join(folder, "shelf"), "c"))

    def create(self, key, value):
        self.shelf[key] = value

    def read(self, key):
        return self.shelf[key]

    def delete(self, key):
        del self.shelf[key]

    def close(self):
        self.shelf.close()


class DiskCacheSystem:
    name = "diskcache"

    def __init__(self, folder):
        import diskcache
        self.cache = diskcache.Cache(os.path.join(folder, "cache"))

    def create(self, key, value):
        if not self.cache.add(key, value, expire=None):
            raise KeyError(f"{key} exists")

    def read(self, key):
        return self.cache.get(key)

    def delete(self, key):
        self.cache.delete(key)

    def close(self):
        self.cache.close()


class SqliteDictSystem:
    name = "sqlitedict"

    def __init__(self, folder):
        from sqlitedict import SqliteDict
        self.db = SqliteDict(os.path.join(folder, "db.sqlite"), autocommit=True,
                             encode=json.dumps, decode=json.loads)

    def create(self, key, value):
        self.db[key] = value

    def read(self, key):
        return self.db[key]

    def delete(self, key):
        del self.db[key]

    def close(self):
        self.db.close()


PEERS = [(ShelveSystem, None), (DiskCacheSystem, "diskcache"),
         (SqliteDictSystem, "sqlitedict")]


# --- Measuring --------------------------------------------------------------

def progress(message):
    print(message, file=sys.stderr, flush=True)


def make_data(n, value_bytes, seed=0):
    """n keys and a JSON object of about value_bytes for each."""
    rng = random.Random(seed)
    keys = [f"user:{i:08d}" for i in range(n)]
    values = []
    for i in range(n):
        value = {"id": i, "name": f"user {i}", "active": i % 3 == 0,
                 "scores": [rng.randrange(100) for _ in range(3)], "note": ""}
        size = len(json.dumps(value, separators=(",", ":")))
        value["note"] = "x" * max(0, value_bytes - size)
        values.append(value)
    return keys, values


def per_op(action, items):
    """Microseconds per call of action over items."""
    start = time.perf_counter()
    for item in items:
        action(item)
    return (time.perf_counter() - start) / len(items) * 1e6


def folder_bytes(folder):
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(folder) for name in names)


def one_round(system_class, keys, values, seed):
    """Create, read and delete every key on a fresh store; times per op."""
    order = keys[:]
    random.Random(seed).shuffle(order)
    pairs = list(zip(keys, values))
    with tempfile.TemporaryDirectory() as folder:
        system = system_class(folder)
        try:
            gc.collect()
            create = per_op(lambda pair: system.create(*pair), pairs)
            disk = folder_bytes(folder) / len(keys)
            read = per_op(system.read, order)
            deletes = order[:SHELVE_DELETES] if system_class is ShelveSystem else order
            delete = per_op(system.delete, deletes)
        finally:
            system.close()
    return {"create": create, "read": read, "delete": delete, "disk": disk}


def memory_per_key(system_class, keys, values):
    """Python memory still held after creating every key, per key."""
    with tempfile.TemporaryDirectory() as folder:
        gc.collect()
        tracemalloc.start()
        try:
            system = system_class(folder)
            for key, value in zip(keys, values):
                system.create(key, value)
            gc.collect()
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
        system.close()
    return held / len(keys)


def compare(systems, keys, values, rounds):
    results = {}
    for system_class in systems:
        best = None
        for r in range(rounds):
            progress(f"{system_class.name}: round {r + 1} of {rounds}, {len(keys)} keys")
            result = one_round(system_class, keys, values, seed=r)
            best = result if best is None else {k: min(best[k], result[k]) for k in best}
        progress(f"{system_class.name}: memory")
        best["memory"] = memory_per_key(system_class, keys, values)
        results[system_class.name] = best
    return results


def at_size(n, value_bytes, rounds, batch=5000):
    """DataStore's cost per op with n keys already in the store."""
    keys, values = make_data(n + batch, value_bytes)
    old, new = keys[:n], list(zip(keys[n:], values[n:]))
    rng = random.Random(n)
    best = {}
    with tempfile.TemporaryDirectory() as folder:
        store = DataStore(os.path.join(folder, "store"))
        try:
            progress(f"DataStore: filling {n} keys")
            for key, value in zip(old, values[:n]):
                store.create(key, value)
            for r in range(rounds):
                progress(f"DataStore at {n} keys: round {r + 1} of {rounds}")
                times = {
                    "create": per_op(lambda pair: store.create(*pair), new),
                    "read": per_op(store.read, rng.choices(old, k=batch)),
                    "delete": per_op(store.delete, [key for key, _ in new]),
                }
                best = {k: min(best.get(k, float("inf")), v) for k, v in times.items()}
        finally:
            store.close()
    return best


# --- Reporting --------------------------------------------------------------

def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def report(results, sizes, args):
    print(f"{datetime.date.today()}, {cpu_name()} ({os.cpu_count()} cores), "
          f"Python {platform.python_version()}, {platform.system()}; "
          f"{args.n} keys, values of about {args.value_bytes} bytes of JSON, "
          f"best of {args.rounds} rounds.\n")
    ours = results["DataStore"]
    print("| system | create µs | read µs | delete µs | disk bytes/key | memory bytes/key |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        cells = [f"{r[op]:.1f}" + ("" if r is ours else f" ({r[op] / ours[op]:.2f}×)")
                 for op in ("create", "read", "delete")]
        print(f"| {name} | {' | '.join(cells)} | {r['disk']:.0f} | {r['memory']:.0f} |")
    print("\n(×: the peer's time divided by DataStore's. Below 1 the peer is faster.)")
    if "shelve (dbm.dumb)" in results:
        print(f"shelve deletes: the first {SHELVE_DELETES}, each rewriting the index.")
    print("\nDataStore with N keys already stored (5,000 operations each):\n")
    print("| keys | create µs | read µs | delete µs |")
    print("| ---: | ---: | ---: | ---: |")
    for n, r in sizes.items():
        print(f"| {n:,} | {r['create']:.1f} | {r['read']:.1f} | {r['delete']:.1f} |")
    if len(sizes) >= 2:
        small, large = (sizes[n] for n in (min(sizes), max(sizes)))
        ratios = ", ".join(f"{op} {large[op] / small[op]:.2f}×"
                           for op in ("create", "read", "delete"))
        print(f"\n{max(sizes):,} keys against {min(sizes):,}: {ratios}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="keys (default 20000)")
    parser.add_argument("--value-bytes", type=int, default=150,
                        help="JSON size of each value (default 150)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, best kept")
    parser.add_argument("--sizes", default="5000,200000",
                        help="store sizes for DataStore's flat-cost check "
                             "(default 5000,200000; empty to skip)")
    args = parser.parse_args(argv)
    systems = [DataStoreSystem]
    for system_class, module in PEERS:
        try:
            if module:
                __import__(module)
            systems.append(system_class)
        except ImportError:
            progress(f"skipping {system_class.name}: "
                     f"python -m pip install {module}")
    keys, values = make_data(args.n, args.value_bytes)
    results = compare(systems, keys, values, args.rounds)
    sizes = {n: at_size(n, args.value_bytes, args.rounds)
             for n in map(int, filter(None, args.sizes.split(",")))}
    report(results, sizes, args)


if __name__ == "__main__":
    main()
