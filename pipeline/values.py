"""Values to and from the JSON text the store keeps, so that a resumed run exports exactly what
an uninterrupted one would (contract section 4).

A value goes through :func:`prepare` once, when its task finishes: it becomes its *canonical*
form (what the row-group buffer, later generators and the exports see) and the JSON text
recorded with the task. ``decode(text)`` gives the canonical value back with the same types,
recursively, so an uninterrupted run (which writes the buffer's values) and a resumed one (which
reloads the store's) write the same row-group files. A value with no exact form raises
:class:`pipeline.errors.UnstorableValueError`, which fails its own cell (contract section 9).

Canonical forms (the README's value table):

- kept as they are: None, bool, int, float (NaN and infinities too), str, list, dict with str
  keys, bytes, finite ``Decimal``, ``date``, ``time``, naive ``datetime``, ``timedelta``;
- converted: tuples and numpy arrays to lists; sets to sorted lists; numpy and pandas scalars
  to the Python ones (``float32(0.1)`` is the float ``0.10000000149011612``); pandas NA and NaT
  to None; a tz-aware datetime or time to the same instant with a fixed UTC offset (a zone name
  becomes its offset); bytearray to bytes; subclasses of str, int, float, dict and list (enums,
  OrderedDict, namedtuples) to the base type;
- refused: text that is not valid Unicode (lone surrogates), dict keys that are not strings,
  non-finite Decimals, sets whose items have no order, times and datetimes finer than a
  microsecond, nesting deeper than Python's recursion limit, any other object.

JSON text: plain JSON values are written as plain JSON, readable with SQL (``tasks.value``).
Types JSON lacks become a one-key object whose key is a tag: ``{"$dt": "2024-01-01T00:00:00"}``,
``{"$date": ...}``, ``{"$time": ...}``, ``{"$td": microseconds}``, ``{"$bytes": base64}``,
``{"$dec": "1.10"}``. So that no plain dict is ever read as a tag, every dict key that starts
with ``$`` is written with one more ``$`` (``{"$bytes": "aGk="}`` is stored as
``{"$$bytes": "aGk="}``) and loses it when read. NaN and infinities use Python's JSON dialect
(``NaN``, ``Infinity``).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
import re
from typing import Any

from pipeline.errors import UnstorableValueError
from pipeline.loaded import loaded

__all__ = ["decode", "encode", "prepare", "to_python", "valid_unicode", "valid_unicode_deep"]


_encode_str = json.encoder.encode_basestring  # the C implementation when available
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_ZERO = dt.timedelta(0)


class _Refused(Exception):
    """Raised inside the walk; ``path`` is filled on the way out, so a value that is stored
    pays nothing for the path it would have had."""

    def __init__(self, why: str) -> None:
        self.why = why
        self.path: list[str] = []


def prepare(value: Any) -> tuple[Any, str]:
    """``(canonical value, its JSON text)``. Plain scalars take a fast path: this runs once per
    finished task, on the event loop. Raises UnstorableValueError saying why and where inside
    the value (``lone surrogate '\\ud83d' at position 14 (at ['a'][2])``)."""
    kind = type(value)
    try:
        if kind is str:
            if not value.isascii():
                _check_text(value)
            return value, _encode_str(value)
        if kind is int:
            return value, repr(value)
        if kind is float:
            return value, repr(value) if math.isfinite(value) else _ENCODER.encode(value)
        if value is None:
            return None, "null"
        if kind is bool:
            return value, "true" if value else "false"
        walk = _Walk()
        canon = walk.canon(value)
    except _Refused as exc:
        where = f" (at {''.join(reversed(exc.path))})" if exc.path else ""
        raise UnstorableValueError(exc.why + where) from None
    except RecursionError:
        raise UnstorableValueError("the value is nested too deeply (or holds itself)") from None
    return canon, _ENCODER.encode(_tagged(canon) if walk.special else canon)


def encode(value: Any) -> str:
    """The JSON text of ``value`` (see :func:`prepare`). Raises UnstorableValueError."""
    return prepare(value)[1]


def decode(text: str) -> Any:
    """The canonical value whose JSON text (:func:`prepare`) is ``text``."""
    return json.loads(text, object_hook=_hook)


# -- canonical form ------------------------------------------------------------------------

def _check_text(text: str) -> None:
    if not text.isascii():  # O(1): CPython knows whether a string is ASCII
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _Refused(f"text is not valid Unicode: lone surrogate {text[exc.start]!r} "
                           f"at position {exc.start}") from None


class _Walk:
    """One canonicalisation. ``special`` tells whether the value holds anything JSON lacks
    (tagged types, keys starting with ``$``), so that plain values skip the tagging pass."""

    __slots__ = ("special",)

    def __init__(self) -> None:
        self.special = False

    def canon(self, value: Any) -> Any:
        kind = type(value)
        if kind is str:
            _check_text(value)
            return value
        if kind is int or kind is float or kind is bool or value is None:
            return value
        if kind is dict:
            return self._dict(value)
        if kind is list or kind is tuple:
            return self._list(value)
        return self._other(value)

    def _list(self, value: Any) -> list:
        out = []
        for i, item in enumerate(value):
            try:
                out.append(self.canon(item))
            except _Refused as exc:
                exc.path.append(f"[{i}]")
                raise
        return out

    def _dict(self, value: Any) -> dict:
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                if not isinstance(key, str):
                    raise _Refused(f"dict keys must be strings: key {key!r} is of type {type(key).__name__}")
                key = str.__str__(key)
            _check_text(key)
            if key[:1] == "$":
                self.special = True
            try:
                out[key] = self.canon(item)
            except _Refused as exc:
                exc.path.append(f"[{key!r}]")
                raise
        return out

    def _other(self, value: Any) -> Any:
        # A numpy value exists only once numpy is loaded: ask pipeline.loaded rather than
        # importing it here (~90 ms), which every command that opens the store would pay.
        np = loaded("numpy")
        if np is not None and isinstance(value, (np.generic, np.ndarray)):
            return self._numpy(value)
        if type(value).__name__ in ("NAType", "NaTType"):  # pandas' missing values (NaT is a datetime)
            return None
        if isinstance(value, dt.datetime):
            return self._datetime(value)
        if isinstance(value, dt.date):
            self.special = True
            return value if type(value) is dt.date else dt.date(value.year, value.month, value.day)
        if isinstance(value, dt.timedelta):
            return self._timedelta(value)
        if isinstance(value, dt.time):
            return self._time(value)
        if isinstance(value, (bytes, bytearray, memoryview)):
            self.special = True
            return bytes(value)
        if isinstance(value, decimal.Decimal):
            if not value.is_finite():
                raise _Refused(f"Decimal('{value}') is not a finite number; return a float or None")
            self.special = True
            return value if type(value) is decimal.Decimal else decimal.Decimal(value)
        if isinstance(value, str):  # str enums, numpy str_
            return self.canon(str.__str__(value))
        if isinstance(value, bool):
            return bool(value)
        if isinstance(value, int):  # int enums
            return int(value)
        if isinstance(value, float):
            return float(value)
        if isinstance(value, dict):
            return self._dict(value)
        if isinstance(value, (list, tuple)):
            return self._list(value)
        if isinstance(value, (set, frozenset)):
            items = self._list(value)
            try:
                return sorted(items)
            except TypeError:
                kinds = ", ".join(sorted({type(v).__name__ for v in items}))
                raise _Refused(f"a set of {kinds} values has no order; return a list") from None
        raise _Refused(f"a {type(value).__module__}.{type(value).__qualname__} has no stored form; return None, "
                       "bool, int, float, str, list, dict, bytes, Decimal, date, time, datetime or timedelta")

    def _numpy(self, value: Any) -> Any:
        import numpy as np

        if isinstance(value, np.ndarray):
            if value.dtype.kind in "Mm" or value.ndim == 0:  # tolist() of datetime64[ns] gives ints
                return self.canon(list(value) if value.ndim else value[()])
            return self.canon(value.tolist())
        if isinstance(value, (np.datetime64, np.timedelta64)):
            if np.isnat(value):
                return None
            micro = value.astype("datetime64[us]" if isinstance(value, np.datetime64) else "timedelta64[us]")
            if micro != value:
                raise _Refused(f"{value!r} is finer than a microsecond; round it to microseconds")
            return self.canon(micro.item())
        return self.canon(value.item())

    def _datetime(self, value: Any) -> dt.datetime:
        self.special = True
        if getattr(value, "nanosecond", 0):  # pandas Timestamp
            raise _Refused(f"{value!r} is finer than a microsecond; round it to microseconds")
        tz = value.tzinfo
        if tz is not None:
            tz = _fixed(value.utcoffset())
        if type(value) is dt.datetime and tz is value.tzinfo and not value.fold:
            return value
        return dt.datetime(value.year, value.month, value.day, value.hour, value.minute, value.second,
                           value.microsecond, tz)

    def _time(self, value: dt.time) -> dt.time:
        self.special = True
        tz = value.tzinfo
        if tz is not None:
            offset = value.utcoffset()
            if offset is None:
                raise _Refused(f"the time {value!r} has a zone without a fixed offset; return a datetime")
            tz = _fixed(offset)
        if type(value) is dt.time and tz is value.tzinfo and not value.fold:
            return value
        return dt.time(value.hour, value.minute, value.second, value.microsecond, tz)

    def _timedelta(self, value: Any) -> dt.timedelta:
        self.special = True
        if getattr(value, "nanoseconds", 0):  # pandas Timedelta
            raise _Refused(f"{value!r} is finer than a microsecond; round it to microseconds")
        if type(value) is dt.timedelta:
            return value
        return dt.timedelta(days=value.days, seconds=value.seconds, microseconds=value.microseconds)


def _fixed(offset: dt.timedelta) -> dt.timezone:
    # What fromisoformat gives back for this offset, so that a decoded value is the same object kind.
    return dt.timezone.utc if offset == _ZERO else dt.timezone(offset)


# -- JSON text -----------------------------------------------------------------------------

def _tagged(value: Any) -> Any:
    """A canonical value as plain JSON data: tags for the types JSON lacks, ``$`` keys escaped."""
    kind = type(value)
    if kind is dict:
        return {("$" + k if k[:1] == "$" else k): _tagged(v) for k, v in value.items()}
    if kind is list:
        return [_tagged(v) for v in value]
    if kind is dt.datetime:
        return {"$dt": value.isoformat()}
    if kind is dt.date:
        return {"$date": value.isoformat()}
    if kind is dt.time:
        return {"$time": value.isoformat()}
    if kind is dt.timedelta:
        return {"$td": (value.days * 86400 + value.seconds) * 1_000_000 + value.microseconds}
    if kind is bytes:
        return {"$bytes": base64.b64encode(value).decode()}
    if kind is decimal.Decimal:
        return {"$dec": str(value)}
    return value


def _timedelta_from(amount: int | float) -> dt.timedelta:
    # Microseconds; versions before tags were escaped wrote seconds, always as a float.
    if type(amount) is float:
        return dt.timedelta(seconds=amount)
    return dt.timedelta(microseconds=amount)


_TAGS = {
    "$dt": dt.datetime.fromisoformat,
    "$date": dt.date.fromisoformat,
    "$time": dt.time.fromisoformat,
    "$td": _timedelta_from,
    "$bytes": base64.b64decode,
    "$dec": decimal.Decimal,
}


def _hook(obj: dict) -> Any:
    for key in obj:
        if key[:1] == "$":
            break
    else:
        return obj
    if len(obj) == 1:
        tag = _TAGS.get(key)
        if tag is not None:
            try:
                return tag(obj[key])
            except (ValueError, TypeError, ArithmeticError):
                # Not written by prepare: a plain dict stored unescaped by an earlier version
                # ({"$date": "2024-01-01T00:00:00Z"}); it stays the dict it was.
                return obj
    return {(k[1:] if k[:2] == "$$" else k): v for k, v in obj.items()}


# -- helpers for other modules ----------------------------------------------------------------

def to_python(value: Any) -> Any:
    """NumPy scalars and arrays, pandas timestamps and NA become plain Python values (for
    templates; stored values go through :func:`prepare`)."""
    item = getattr(value, "item", None)
    if item is not None and type(value).__module__ == "numpy":
        if getattr(value, "ndim", 0):
            return value.tolist()
        return item()
    if type(value).__name__ == "Timestamp":
        return value.to_pydatetime()
    if value is not None and type(value).__name__ in ("NAType", "NaTType"):
        return None
    return value


_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_unicode(text: str) -> str:
    """``text`` with unpaired surrogates replaced by U+FFFD (a pair split into two code points
    is joined). For text from outside, such as LLM answers, before it is stored."""
    if text.isascii() or _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def valid_unicode_deep(value: Any) -> Any:
    """:func:`valid_unicode` applied to every string of a parsed JSON value, keys included."""
    kind = type(value)
    if kind is str:
        return valid_unicode(value)
    if kind is list:
        return [valid_unicode_deep(v) for v in value]
    if kind is dict:
        return {valid_unicode(k): valid_unicode_deep(v) for k, v in value.items()}
    return value
