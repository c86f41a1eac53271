"""Checking and encoding what users pass: keys, values and ttls.

A key is a ``str`` of 1 to ``MAX_KEY_LENGTH`` characters, stored as UTF-8.
A value is a ``dict`` of plain JSON, stored as compact UTF-8 JSON of at most
``MAX_VALUE_BYTES``. A ttl is a whole number of seconds, stored as the
``time.time()`` at which the key expires. Each check raises the error from
``errors`` that names what is wrong.
"""

from __future__ import annotations

import json
import math
from json.scanner import make_scanner
from typing import Any, Callable, Iterable, Optional

from .errors import (
    InvalidKeyError, InvalidTTLError, InvalidValueError, KeyTypeError,
    TTLTypeError, ValueTypeError,
)

MAX_KEY_LENGTH = 32             # characters (code points)
MAX_VALUE_BYTES = 16 * 1024     # compact UTF-8 JSON
MAX_VALUE_DEPTH = 100           # dicts and lists nested in a value, the value included

# The latest expiry we accept: 9999-12-31 23:59:59 UTC, the end of datetime.
_LATEST_EXPIRY = 253402300799


def _encode_key(key: object) -> tuple[str, bytes]:
    """Return the key as a plain str and as UTF-8, or raise if it is not valid.

    A str subclass is copied first (str.__str__), so that no method it
    overrides (__len__, encode, __eq__) takes part in the checks.
    """
    if type(key) is not str:
        if not isinstance(key, str):
            raise KeyTypeError(f"key must be a str, not {type(key).__name__}")
        key = str.__str__(key)
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        raise InvalidKeyError(
            f"key must be 1 to {MAX_KEY_LENGTH} characters, "
            f"got {len(key)}: {key!r}", key=key)
    try:
        return key, key.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(f"key {key!r} cannot be encoded as UTF-8: {exc.reason}",
                              key=key) from None


# Compact JSON, UTF-8 left as it is. One encoder for every call: building one
# is a quarter of json.dumps's time, and encode() keeps no state between calls.
_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, check_circular=False)
# encode() itself builds the C encoder afresh at every call, 0.5 µs of its
# 1.2: it is built once here, with the same settings (where there is one).
_C_MAKE_ENCODER = getattr(json.encoder, "c_make_encoder", None)  # (not in typeshed)
_C_ENCODE = None if _C_MAKE_ENCODER is None else _C_MAKE_ENCODER(
    None, _JSON.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)


def _json_text(value: Any) -> str:
    """_JSON.encode(value), of a plain value (see _is_plain)."""
    return "".join(_C_ENCODE(value, 0)) if _C_ENCODE else _JSON.encode(value)


class _NotPlain(Exception):
    """What makes a value not plain JSON (see _plain)."""


def _plain(value: object, depth: int) -> Any:
    """A copy of `value` made only of dict, list, str, int, float, bool and
    None, or raise _NotPlain.

    It refuses what JSON would change (tuples, non-str keys, NaN), so that
    read() returns an equal value, and nesting deeper than MAX_VALUE_DEPTH,
    which json.loads may not return when called a few frames deep. Subclasses
    are read through their base type's own methods (dict.items, str.__str__,
    ...), so nothing they override decides what is stored.
    """
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return value
    if isinstance(value, float):
        number = float.__float__(value)
        if number != number or number in (float("inf"), float("-inf")):
            raise _NotPlain(f"{number} is not a JSON number")
        return number
    if isinstance(value, (dict, list)):
        if depth >= MAX_VALUE_DEPTH:
            raise _NotPlain(f"it is nested more than {MAX_VALUE_DEPTH} levels deep "
                            "(or refers to itself)")
        if isinstance(value, list):
            return [_plain(item, depth + 1) for item in list.__iter__(value)]
        copy = {}
        for name, item in dict.items(value):
            if not isinstance(name, str):
                raise _NotPlain(f"key {name!r} is not a str (JSON would make it one)")
            copy[str.__str__(name)] = _plain(item, depth + 1)
        return copy
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):  # but not bool, which cannot be subclassed
        return int.__int__(value)
    raise _NotPlain(f"a {kind.__name__} is not JSON" + (
        " (use a list: JSON would make it one)" if isinstance(value, tuple) else ""))


def _is_plain(value: object, depth: int) -> bool:
    """Whether `value` holds only the exact types dict (with str keys), list,
    str, int, finite float, bool and None, nested at most MAX_VALUE_DEPTH
    levels: then JSON writes it as it is and read() returns an equal value,
    with no copy made. Anything else goes through _plain, which copies what
    it can and says what it cannot. (Scalars are checked in the loops, not
    by a call each: most of a value is scalars.)"""
    if depth >= MAX_VALUE_DEPTH:
        return False
    if type(value) is dict:
        items: Iterable[tuple[object, object]] = value.items()
    elif type(value) is list:
        items = enumerate(value)
    else:
        return False
    for name, item in items:
        if type(name) is not str and type(value) is dict:
            return False
        scalar = type(item)
        if scalar is str or scalar is int or scalar is bool or item is None:
            continue
        if scalar is float:
            if not math.isfinite(item):  # type: ignore[arg-type]  # (a float: checked)
                return False
        elif not _is_plain(item, depth + 1):
            return False
    return True


def _encode_value(key: str, value: object) -> bytes:
    """Return the value as compact UTF-8 JSON, or raise if it is not storable."""
    if not isinstance(value, dict):
        raise ValueTypeError(
            f"value for {key!r} must be a dict, not {type(value).__name__}", key=key)
    try:
        body = _json_text(value if _is_plain(value, 0) else _plain(value, 0)).encode("utf-8")
    except (_NotPlain, UnicodeEncodeError) as exc:
        reason = exc.reason if isinstance(exc, UnicodeEncodeError) else exc
        raise InvalidValueError(f"value for {key!r} is not plain JSON: {reason}",
                                key=key) from None
    except ValueError as exc:  # an int longer than sys.get_int_max_str_digits()
        raise InvalidValueError(f"value for {key!r} cannot be written as JSON: {exc}",
                                key=key) from None
    if len(body) > MAX_VALUE_BYTES:
        raise InvalidValueError(
            f"value for {key!r} is {len(body)} bytes as JSON; "
            f"the limit is {MAX_VALUE_BYTES}", key=key)
    return body


def _expiry(key: str, ttl: object, now: float) -> float:
    """Return expires_at for a ttl given at time `now` (0.0 for never)."""
    if ttl is None:
        return 0.0
    if isinstance(ttl, bool) or not isinstance(ttl, int):
        raise TTLTypeError(
            f"ttl for {key!r} must be None or an int of seconds, "
            f"not {type(ttl).__name__}", key=key)
    if ttl <= 0:
        raise InvalidTTLError(f"ttl for {key!r} must be positive, got {ttl}", key=key)
    if ttl > _LATEST_EXPIRY - now:
        raise InvalidTTLError(
            f"ttl for {key!r} is too large: {ttl} seconds is past the year 9999",
            key=key)
    return now + ttl

# json.loads(text) is this scanner's call behind three layers of Python (a
# type check, a whitespace match, raw_decode), a third of a read's decoding.
_SCAN: Callable[[str, int], tuple[Any, int]] = make_scanner(
    json.JSONDecoder())  # type: ignore[arg-type]  # (typeshed: the class, not its call)


def _decode_object(body: bytes) -> Optional[dict[str, Any]]:
    """A record's body as the dict read() returns, or None if it is not a
    JSON object (a CRC-valid record that is not ours). As json.loads reads
    it; the scanner alone reads the compact JSON that create writes."""
    try:
        text = body.decode("utf-8")
        try:
            value, end = _SCAN(text, 0)
        except StopIteration:  # (at 0: leading whitespace, say)
            end = -1
        if end != len(text):
            value = json.loads(text)
    except (ValueError, RecursionError):  # (UnicodeDecodeError too)
        return None
    return value if type(value) is dict else None
