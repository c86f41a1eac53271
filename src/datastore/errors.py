"""The exceptions: one hierarchy rooted at DataStoreError.

Each error a user can meet subclasses the builtin a caller would naturally
catch (``KeyNotFoundError`` is a ``KeyError``, the argument errors are
``TypeError`` or ``ValueError``), carries the ``key`` and ``path`` it is
about, and pickles. The operating system's own failures (a full disk, a
folder you may not write) stay the ``OSError`` they are.

Two private exceptions are the engine's signals to the facade, which turns
them into the public errors with messages that name the store; ``_unit``
marks the engine's writes, so that one cut short by any other exception is
known.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional, TypeVar, cast

# Recovery reports damage here, and upkeep its retried failures. The library
# configures no handlers.
_log = logging.getLogger("datastore")


class DataStoreError(Exception):
    """Base of every error this module raises.

    ``key`` and ``path``, where they apply, name the key and the store.
    """

    def __init__(self, message: str, *, key: Optional[str] = None,
                 path: Any = None) -> None:
        super().__init__(message)
        self.key = key
        self.path = path

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> Any:
        return _rebuild_error, (type(self), str(self), self.key, self.path)


def _rebuild_error(cls: type, message: str, key: Optional[str], path: Any) -> Any:
    return cls(message, key=key, path=path)


class DataStoreTypeError(DataStoreError, TypeError):
    """An argument has the wrong type."""


class DataStoreValueError(DataStoreError, ValueError):
    """An argument has the right type but a wrong value, or is over a limit."""


class KeyTypeError(DataStoreTypeError):
    """The key is not a ``str``."""


class InvalidKeyError(DataStoreValueError):
    """The key is empty, longer than 32 characters, or not encodable."""


class ValueTypeError(DataStoreTypeError):
    """The value is not a ``dict``."""


class InvalidValueError(DataStoreValueError):
    """The value is not plain JSON, or is larger than 16 KiB as JSON."""


class TTLTypeError(DataStoreTypeError):
    """The ttl is not ``None`` or an ``int``."""


class InvalidTTLError(DataStoreValueError):
    """The ttl is not positive, or is too large."""


class KeyExistsError(DataStoreError):
    """``create`` was called for a key that is live."""


class KeyNotFoundError(DataStoreError, KeyError):
    """The key was never created, was deleted, or has expired."""


class StoreFullError(DataStoreError):
    """The write would take the store's files over ``max_bytes`` (or, at
    open, the store already needs more than the ``max_bytes`` given)."""


class StoreLockedError(DataStoreError):
    """The store is open elsewhere: in another process, or in this one."""


class StoreClosedError(DataStoreError):
    """The store was closed."""


class StoreForkedError(DataStoreError):
    """The store was opened by another process, which this one was forked from."""


class CorruptStoreError(DataStoreError):
    """A store file is damaged or is not a store file."""



if __name__.endswith(".errors"):  # in the package: named, shown and pickled as datastore.X
    for _public in (DataStoreError, DataStoreTypeError, DataStoreValueError, KeyTypeError,
                    InvalidKeyError, ValueTypeError, InvalidValueError, TTLTypeError,
                    InvalidTTLError, KeyExistsError, KeyNotFoundError, StoreFullError,
                    StoreLockedError, StoreClosedError, StoreForkedError, CorruptStoreError,
                    _rebuild_error):  # (which pickles name: the copy-in file has it too)
        _public.__module__ = __name__[:-len(".errors")]


def _damaged(path: str, detail: str) -> CorruptStoreError:
    return CorruptStoreError(f"{path} is damaged: {detail}; move the store "
                             "away and restore a backup", path=path)


class _Locked(Exception):
    """Another process holds the data file's lock. (DataStore says so.)"""


class _StoreFull(Exception):
    """A write would take the files over max_bytes. (The engine's own signal:
    DataStore turns it into StoreFullError.)"""

    def __init__(self, needed: int, used: int, reason: str = "") -> None:
        super().__init__(needed, used)
        self.needed, self.used, self.reason = needed, used, reason


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _unit(method: _Method) -> _Method:
    """A write that leaves memory matching the files when it ends, however
    it ends: `busy` is set while it runs and cleared when it returns or
    raises one of its own errors (OSError, _StoreFull), whose paths keep the
    two in step. Anything else that cuts it short (KeyboardInterrupt, or
    SystemExit from a signal handler, between any two statements) leaves
    `busy` set, and the store reads its files again, as after a crash,
    before it does anything more (DataStore._usable). First it calls
    `_changing()`: close() then has a snapshot to write."""
    @functools.wraps(method)
    def run(self: Any, *args: Any) -> Any:
        if not self.changed:
            self._changing()  # (may raise OSError: then no key has changed)
        self.busy = True
        try:
            result = method(self, *args)
        except (OSError, _StoreFull):
            self.busy = False
            raise
        self.busy = False
        return result
    return cast(_Method, run)
