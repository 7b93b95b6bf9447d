"""pipeline.values: every kept value comes back from its JSON text with the same types; plain
data is never read as a tag; what has no exact form is refused, saying why and where."""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import math
import zoneinfo
from collections import OrderedDict, namedtuple

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import PipelineError, UnstorableValueError
from pipeline.values import decode, encode, prepare, valid_unicode, valid_unicode_deep

D = decimal.Decimal
UTC2 = dt.timezone(dt.timedelta(hours=2))


class Color(str, enum.Enum):
    RED = "red"


class Level(enum.IntEnum):
    HIGH = 3


Point = namedtuple("Point", "x y")


def same(a, b) -> bool:
    """Equal with the same types, recursively (NaN equals NaN, datetimes keep their offset)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (dt.datetime, dt.time)):
        return a == b and a.utcoffset() == b.utcoffset() and a.tzinfo == b.tzinfo
    if isinstance(a, D):
        return str(a) == str(b)
    return a == b


# (value, canonical value, JSON text): what the store keeps, and how it reads with SQL.
KEPT = [
    (None, None, "null"),
    (True, True, "true"),
    (7, 7, "7"),
    (2**80, 2**80, "1208925819614629174706176"),
    (0.1, 0.1, "0.1"),
    (-0.0, -0.0, "-0.0"),
    (float("nan"), float("nan"), "NaN"),
    (float("inf"), float("inf"), "Infinity"),
    (float("-inf"), float("-inf"), "-Infinity"),
    ("é \x00 \"q\"", "é \x00 \"q\"", '"é \\u0000 \\"q\\""'),
    ({"a": [1, "x", None]}, {"a": [1, "x", None]}, '{"a":[1,"x",null]}'),
    (b"\x00\xff", b"\x00\xff", '{"$bytes":"AP8="}'),
    (bytearray(b"hi"), b"hi", '{"$bytes":"aGk="}'),
    (D("1.10"), D("1.10"), '{"$dec":"1.10"}'),
    (D("1E+3"), D("1E+3"), '{"$dec":"1E+3"}'),
    (np.int64(5), 5, "5"),
    (np.float32(0.1), 0.10000000149011612, "0.10000000149011612"),
    (np.bool_(False), False, "false"),
    (np.array([[1, 2], [3, 4]]), [[1, 2], [3, 4]], "[[1,2],[3,4]]"),
    (np.array(["2024-01-01T00:00:00"], dtype="datetime64[ns]"), [dt.datetime(2024, 1, 1)],
     '[{"$dt":"2024-01-01T00:00:00"}]'),
    (np.datetime64("NaT"), None, "null"),
    (pd.NA, None, "null"),
    (pd.NaT, None, "null"),
    (pd.Timestamp("2024-01-01 10:00:00.5"), dt.datetime(2024, 1, 1, 10, 0, 0, 500000),
     '{"$dt":"2024-01-01T10:00:00.500000"}'),
    (pd.Timedelta(seconds=1.5), dt.timedelta(seconds=1.5), '{"$td":1500000}'),
    (dt.datetime(2024, 1, 1, 12), dt.datetime(2024, 1, 1, 12), '{"$dt":"2024-01-01T12:00:00"}'),
    (dt.datetime(2024, 7, 1, 12, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")), dt.datetime(2024, 7, 1, 12, tzinfo=UTC2),
     '{"$dt":"2024-07-01T12:00:00+02:00"}'),
    (dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc), dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
     '{"$dt":"2024-01-01T00:00:00+00:00"}'),
    (dt.date(2024, 2, 29), dt.date(2024, 2, 29), '{"$date":"2024-02-29"}'),
    (dt.time(1, 2, 3, 4), dt.time(1, 2, 3, 4), '{"$time":"01:02:03.000004"}'),
    (dt.timedelta(days=999999999, microseconds=1), dt.timedelta(days=999999999, microseconds=1),
     '{"$td":86399999913600000001}'),
    ({3, 1, 2}, [1, 2, 3], "[1,2,3]"),
    (frozenset({"b", "a"}), ["a", "b"], '["a","b"]'),
    ((1, (2, "x")), [1, [2, "x"]], '[1,[2,"x"]]'),
    (Point(1, 2), [1, 2], "[1,2]"),
    (OrderedDict(b=1, a=2), {"b": 1, "a": 2}, '{"b":1,"a":2}'),
    (Color.RED, "red", '"red"'),
    (Level.HIGH, 3, "3"),
    ({"$bytes": "aGVsbG8="}, {"$bytes": "aGVsbG8="}, '{"$$bytes":"aGVsbG8="}'),
    ({"$date": "2024-01-01T00:00:00Z"}, {"$date": "2024-01-01T00:00:00Z"}, '{"$$date":"2024-01-01T00:00:00Z"}'),
    ({"$$x": {"$dt": 1}, "k": b""}, {"$$x": {"$dt": 1}, "k": b""}, '{"$$$x":{"$$dt":1},"k":{"$bytes":""}}'),
    ("x" * 10_000_000, "x" * 10_000_000, None),
]


def _case_id(value) -> str:
    """The value's repr, a set's items sorted: string hashes differ from process to process, and
    pytest-xdist's workers must all collect the same test ids."""
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__name__}({sorted(value)!r})"
    return repr(value)[:40]


@pytest.mark.parametrize("value, canonical, text", KEPT, ids=[_case_id(k[0]) for k in KEPT])
def test_a_kept_value_comes_back_from_its_text_with_the_same_types(value, canonical, text):
    got, got_text = prepare(value)
    assert same(got, canonical)
    if text is not None:
        assert got_text == text
    assert same(decode(got_text), canonical)
    assert encode(canonical) == got_text  # the canonical form is a fixed point


def test_plain_json_stays_plain_json_text():
    value = {"name": "x", "tags": ["a", "b"], "n": 3, "score": 0.5, "ok": True, "none": None}
    assert json.loads(encode(value)) == value


def test_tags_written_by_earlier_versions_still_decode():
    assert decode('{"$td": 1.5}') == dt.timedelta(seconds=1.5)  # seconds, as a float
    assert decode('{"$dt": "2024-01-01T00:00:00"}') == dt.datetime(2024, 1, 1)
    assert decode('{"$other": 1}') == {"$other": 1}
    # Plain dicts that those versions stored unescaped: what parses as a tag is read as one (the
    # text cannot tell), what does not stays the dict it was instead of failing the resume.
    assert decode('{"$date": "2024-01-01T00:00:00Z"}') == {"$date": "2024-01-01T00:00:00Z"}
    assert decode('{"$dec": "abc"}') == {"$dec": "abc"}
    assert decode('{"$bytes": 5}') == {"$bytes": 5}


REFUSED = [
    ("half an emoji: \ud83d", "text is not valid Unicode: lone surrogate '\\ud83d' at position 15"),
    ({"a": [1, {"b": "\udc00"}]}, "lone surrogate '\\udc00' at position 0 (at ['a'][1]['b'])"),
    ({"\ud83d": 1}, "lone surrogate '\\ud83d' at position 0"),
    ({1: "a", "1": "b"}, "dict keys must be strings: key 1 is of type int"),
    ({"a": {(1, 2): 0}}, "dict keys must be strings: key (1, 2) is of type tuple (at ['a'])"),
    (object(), "a builtins.object has no stored form"),
    ([1, print], "a builtins.builtin_function_or_method has no stored form; return None, bool"),
    (D("NaN"), "Decimal('NaN') is not a finite number"),
    ({1, "a"}, "a set of int, str values has no order; return a list"),
    (pd.Timestamp("2024-01-01 00:00:00.000000001"), "finer than a microsecond"),
    (np.datetime64("2024-01-01T00:00:00.000000001"), "finer than a microsecond"),
    (dt.time(1, tzinfo=zoneinfo.ZoneInfo("Europe/Paris")), "has a zone without a fixed offset"),
    (pd.Series([1]), "Series has no stored form"),
]


@pytest.mark.parametrize("value, why", REFUSED, ids=[r[1][:30] for r in REFUSED])
def test_a_value_with_no_exact_form_is_refused_saying_why_and_where(value, why):
    with pytest.raises(UnstorableValueError) as info:
        prepare(value)
    assert why in str(info.value)
    assert isinstance(info.value, PipelineError)


def test_a_value_that_holds_itself_is_refused():
    loop: list = []
    loop.append(loop)
    with pytest.raises(UnstorableValueError, match="nested too deeply"):
        prepare(loop)


def test_text_from_outside_is_made_valid_unicode():
    assert valid_unicode("plain") == "plain"
    assert valid_unicode("half \ud83d, whole \ud83d\ude00") == "half \ufffd, whole \U0001f600"
    assert valid_unicode_deep({"k\udc00": ["\ud83d", 1, None]}) == {"k\ufffd": ["\ufffd", 1, None]}
