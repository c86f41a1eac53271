"""White-box tests of datastore.codec: that plain values are encoded as they
are, with no copy, and everything else through the copy that says what is
wrong. What a user sees of it (which values are taken, which refused, and
the messages) is in test_datastore.py."""

import json

import pytest

from datastore import InvalidValueError, codec


class Dict(dict):
    def items(self):  # what JSON would call; the store must not
        return [("lie", True)]


class Str(str):
    pass


def nested(depth):
    value = {}
    for _ in range(depth - 1):
        value = {"v": value}
    return value


def circular():
    value = {}
    value["self"] = value
    return value


PLAIN = [{}, {"a": 1, "b": [1, 2.5, True, None, "x", []], "c": {"d": {"e": "ü"}}},
         {"big": 10 ** 30, "neg": -0.0}, nested(codec.MAX_VALUE_DEPTH)]
NOT_PLAIN = [Dict(a=1), {"a": Dict()}, {"a": Str("s")}, {"a": (1, 2)}, {1: "a"},
             {"a": float("nan")}, {"a": [float("inf")]}, {"a": {Str("k"): 1}},
             nested(codec.MAX_VALUE_DEPTH + 1), circular(), {"a": [True, False, object()]}]


@pytest.mark.parametrize("value", PLAIN)
def test_a_plain_value_is_encoded_as_it_is_with_no_copy(value, monkeypatch):
    assert codec._is_plain(value, 0)
    assert codec._plain(value, 0) == value  # what the copy would have made
    monkeypatch.setattr(codec, "_plain", lambda value, depth: pytest.fail("copied"))
    body = codec._encode_value("k", value)
    assert json.loads(body) == value


@pytest.mark.parametrize("value", NOT_PLAIN)
def test_anything_else_goes_through_the_copy(value, monkeypatch):
    assert not codec._is_plain(value, 0)
    copied = []
    real = codec._plain
    monkeypatch.setattr(codec, "_plain", lambda value, depth: copied.append(1)
                        or real(value, depth))
    try:
        body = codec._encode_value("k", value)
    except InvalidValueError:
        pass  # refused, by the copy, which says why
    else:
        assert json.loads(body) == real(value, 0)
    assert copied


@pytest.mark.parametrize("body", [
    b'{"a":1}', b'{"a": [1, 2.5, "\\u00e9", null, true]}', b' {"a":1}', b'{"a":1}\n',
    b'\t{"a":{"b":{}}} ', b'{}', b'[1]', b'"s"', b'{"a":1}x', b'{"a":', b'', b'\xff',
    b'{"a":NaN}', b'[' * 100_000, "{\"ключ\":\"🔑\"}".encode(),
])
def test_a_body_decodes_as_json_loads_reads_it(body):
    try:
        expected = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):
        expected = None
    assert codec._decode_object(body) == (expected if type(expected) is dict else None)
