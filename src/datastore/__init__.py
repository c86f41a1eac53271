"""A small persistent key-value store in one file, for one process at a time.

    >>> import tempfile
    >>> from datastore import DataStore
    >>> with tempfile.TemporaryDirectory() as folder, DataStore(folder + "/people") as store:
    ...     store.create("ada", {"born": 1815, "known for": "the first program"})
    ...     store.read("ada")["born"]
    1815

Copy ``datastore.py`` into your project (its only dependency is ``fasteners``),
or install the package ``datastore-kv``; either way, ``import datastore``.
The interface::

    store = DataStore(path=None, *, max_bytes=MAX_STORE_BYTES, timeout=0)
    store.create(key, value, ttl=None)  # a new key only
    store.set(key, value, ttl=None)     # a new key, or replace a live one
    store.read(key)                     # a new dict; KeyNotFoundError if missing
    store.get(key, default=None)
    store.delete(key)
    store.ttl(key)                      # seconds left, or None
    key in store, len(store), store.keys(), iter(store)
    store.compact(), store.sync(), store.check(), store.close()   # or: with
    datastore.create/set/read/get/delete/keys/ttl/close(...)     # default store

Guarantees
----------
* Keys are ``str`` of 1 to 32 characters; values are ``dict`` objects of at most
  16 KiB as compact UTF-8 JSON, and ``read`` returns a dict equal to the one
  stored (values JSON would change, such as tuples or non-string keys, and
  nesting deeper than ``MAX_VALUE_DEPTH`` levels, are refused). ``create``
  never overwrites a live key; ``set`` replaces one atomically.
* A key created with ``ttl=N`` expires N seconds after the clock reading the
  create takes just before it writes (wall-clock time, ``time.time()``); from
  then on it is gone for ``read`` and ``delete`` and may be created again.
* The store's files never add up to more than ``max_bytes`` (1 GiB by
  default), at any instant, and the space of deleted and expired values is
  used again by the next write that needs it.
* Every call costs about the same however many keys the store holds: no call
  but opening, closing and ``compact()`` does work in proportion to the store.
* Every operation that returned is in the files: killing the process at any
  instant loses nothing that returned, and the operation that was running is
  either wholly done or not done at all. ``sync()`` and ``close()`` also
  fsync, so what they cover survives a power cut.
* One process at a time may open a store; any number of its threads may use
  it. A child made by ``fork()`` cannot use its parent's store object. A store
  that is garbage collected, or still open at exit, is closed cleanly.
* Every error is a ``DataStoreError`` (or, for the operating system's own
  failures such as a full disk, the ``OSError`` it raised), and a call that
  raises changes nothing a later call could observe.

Limits
------
* Keys and values are read from disk on every call and never cached. The
  index is a file, ``path.idx``, mapped into memory: the process holds a few
  bytes a key of its own (16 for a key with a ttl).
* A clean open reads the headers and what the last close appended to
  ``path.idx``; after a crash it scans the whole ``.dat`` and rebuilds it.
* A store holds two locks while open: ``fasteners``' record lock on
  ``path.lock`` and an ``flock`` on ``path.dat`` (POSIX), so that deleting
  ``path.lock`` does not let a second process in. Neither works on network
  file systems. See the README for the traps of each and how they are met.

How it is built
---------------
One module per concern, each readable alone, in the order the copy-in file
``datastore.py`` holds them: ``errors`` (the exceptions), ``codec`` (checking
keys, values and ttls), ``format`` (the data file, field by field), ``space``
(free extents and expiries), ``index`` (the hash table in ``path.idx``),
``locks`` (one process per store), ``snapshot`` (what a clean close leaves
for a fast open), ``recovery`` (the scan after a crash), ``legacy``
(converting 1.0 stores), ``compaction`` (moving records down, and
``compact()``), ``opening`` (from the files to a loaded store), ``engine``
(how each call changes the files), ``store`` (``DataStore`` and the default
store) and ``cli`` (the command line, with ``export`` and ``import``).
"""

from __future__ import annotations

__version__ = "4.0.0"
__all__ = [
    "DataStore", "create", "read", "delete", "get", "keys", "ttl", "close",
    "MAX_KEY_LENGTH", "MAX_VALUE_BYTES", "MAX_VALUE_DEPTH", "MAX_STORE_BYTES",
    "MIN_STORE_BYTES",
    "DataStoreError", "DataStoreTypeError", "DataStoreValueError",
    "KeyTypeError", "InvalidKeyError", "ValueTypeError", "InvalidValueError",
    "TTLTypeError", "InvalidTTLError", "KeyExistsError", "KeyNotFoundError",
    "StoreFullError", "StoreLockedError", "StoreClosedError",
    "StoreForkedError", "CorruptStoreError",
]
# datastore.set is there too, but not in __all__: `from datastore import *`
# must not hide the builtin set.

from .cli import main
from .codec import MAX_KEY_LENGTH, MAX_VALUE_BYTES, MAX_VALUE_DEPTH
from .errors import _rebuild_error  # noqa: F401  (pickled errors name datastore._rebuild_error)
from .errors import (
    CorruptStoreError, DataStoreError, DataStoreTypeError, DataStoreValueError,
    InvalidKeyError, InvalidTTLError, InvalidValueError, KeyExistsError,
    KeyNotFoundError, KeyTypeError, StoreClosedError, StoreForkedError,
    StoreFullError, StoreLockedError, TTLTypeError, ValueTypeError,
)
from .store import (
    MAX_STORE_BYTES, MIN_STORE_BYTES, DataStore, close, create, delete, get, keys,
    read, set, ttl,
)
