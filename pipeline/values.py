"""Values to and from JSON text, so that a resumed run exports exactly what an uninterrupted one
would.

Plain JSON types go through unchanged, so recorded values stay readable with SQL. Types JSON
lacks are written as a one-key object tagged with ``$``: ``{"$dt": "2024-01-01T00:00:00"}``.
NumPy scalars become Python numbers; NaN and infinities are kept (Python's JSON dialect).
"""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import math
from typing import Any

__all__ = ["encode", "decode", "to_python"]


def to_python(value: Any) -> Any:
    """NumPy scalars and arrays, pandas timestamps and NA become plain Python values."""
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


def _default(value: Any) -> Any:
    plain = to_python(value)
    if plain is not value:
        return plain
    if isinstance(value, dt.datetime):
        return {"$dt": value.isoformat()}
    if isinstance(value, dt.date):
        return {"$date": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"$td": value.total_seconds()}
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, decimal.Decimal):
        return {"$dec": str(value)}
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot record a value of type {type(value).__name__}; return JSON-like values")


def _hook(obj: dict) -> Any:
    if len(obj) == 1:
        ((key, val),) = obj.items()
        if key == "$dt":
            return dt.datetime.fromisoformat(val)
        if key == "$date":
            return dt.date.fromisoformat(val)
        if key == "$td":
            return dt.timedelta(seconds=val)
        if key == "$bytes":
            return base64.b64decode(val)
        if key == "$dec":
            return decimal.Decimal(val)
    return obj


_ENCODER = json.JSONEncoder(default=_default, separators=(",", ":"), ensure_ascii=False)
_encode_str = json.encoder.encode_basestring  # the C implementation when available
_FAST = {
    str: _encode_str,
    int: int.__repr__,
    bool: lambda v: "true" if v else "false",
    type(None): lambda v: "null",
}


def encode(value: Any) -> str:
    """JSON text of ``value``. Plain scalars skip the encoder: this runs once per recorded task."""
    fast = _FAST.get(type(value))
    if fast is not None:
        return fast(value)
    if type(value) is float:
        return repr(value) if math.isfinite(value) else _ENCODER.encode(value)
    return _ENCODER.encode(value)


def decode(text: str) -> Any:
    return json.loads(text, object_hook=_hook)

