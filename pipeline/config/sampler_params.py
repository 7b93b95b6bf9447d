"""The ``params`` of each ``sampler`` kind (pydantic models, no numpy).

:class:`~pipeline.config.models.SamplerColumn` checks a column's params against these and keeps
the normalised dump, so the draw functions of :mod:`pipeline.generators.samplers` can trust what
they are given.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["SAMPLER_PARAMS"]

_INT64 = (-(2**63), 2**63 - 1)
_JSON_VALUES = (str, int, float, bool, type(None), list, dict)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class _CategoryParams(_Params):
    values: list[Any] = Field(min_length=1)
    weights: list[float] | None = None

    @model_validator(mode="after")
    def _check(self):
        for value in self.values:
            if not isinstance(value, _JSON_VALUES):
                raise ValueError(f"values: {value!r} is a {type(value).__name__}; quote it to make it text")
        if self.weights is not None:
            if len(self.weights) != len(self.values):
                raise ValueError(
                    f"weights has {len(self.weights)} entries but values has {len(self.values)}; give one weight per value"
                )
            if any(not math.isfinite(w) or w < 0 for w in self.weights):
                raise ValueError("weights must be finite numbers >= 0")
            if sum(self.weights) <= 0:
                raise ValueError("weights must not all be 0")
        return self


class _IntegerParams(_Params):
    low: int = Field(ge=_INT64[0], le=_INT64[1])
    high: int = Field(ge=_INT64[0], le=_INT64[1])

    @model_validator(mode="after")
    def _check(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high}); both are inclusive")
        return self


class _UniformParams(_Params):
    low: float
    high: float

    @model_validator(mode="after")
    def _check(self):
        _finite(self.low), _finite(self.high)
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        return self


class _GaussianParams(_Params):
    mean: float
    stddev: float = Field(ge=0)

    @model_validator(mode="after")
    def _check(self):
        _finite(self.mean), _finite(self.stddev)
        return self


class _BernoulliParams(_Params):
    p: float = Field(ge=0, le=1)


class _UuidParams(_Params):
    pass


def _as_datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, dt.date):
        return dt.datetime(value.year, value.month, value.day)
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an ISO date or datetime (e.g. 2024-01-31 or 2024-01-31T12:00:00)") from None
    raise ValueError(f"{value!r} is not a date; write an ISO date such as 2024-01-31")


class _DatetimeParams(_Params):
    start: Any
    end: Any

    @model_validator(mode="after")
    def _check(self):
        start, end = _as_datetime(self.start), _as_datetime(self.end)
        if (start.tzinfo is None) != (end.tzinfo is None):
            raise ValueError("start and end must both have a time zone, or both have none")
        if not start < end:
            raise ValueError(f"start ({start.isoformat()}) must be before end ({end.isoformat()})")
        # One canonical form, so the fingerprint and to_json do not depend on how YAML typed it.
        self.start, self.end = start.isoformat(), end.isoformat()
        return self


SAMPLER_PARAMS: dict[str, type[BaseModel]] = {
    "category": _CategoryParams,
    "integer": _IntegerParams,
    "uniform": _UniformParams,
    "gaussian": _GaussianParams,
    "bernoulli": _BernoulliParams,
    "uuid": _UuidParams,
    "datetime": _DatetimeParams,
}
