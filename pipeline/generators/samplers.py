"""``sampler`` columns: random values that are a pure function of (seed, column, record index).

Their parameters are checked by config validation (:mod:`pipeline.config.sampler_params`), so
the draw functions trust what they are given.

No random number generator object carries state from one record to the next: each value is a
counter-based hash (splitmix64's finaliser) of the record index mixed with a 64-bit key derived
from the config seed and the column name. So a record gets the same value whichever row group,
worker, process or resume produces it, and a whole row group is a handful of numpy operations.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.generators.base import Generator

if TYPE_CHECKING:
    from pipeline.config.models import PipelineConfig, SamplerColumn

__all__ = ["SamplerGenerator", "derive_keys", "hash64", "unit_floats"]

_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)
_TWO_POW_M53 = 2.0**-53


def derive_keys(seed: int, name: str) -> tuple[np.uint64, ...]:
    """Four independent 64-bit keys for (seed, name), one per stream a sampler may need."""
    digest = hashlib.sha256(f"pipeline/v1\x00{seed}\x00{name}".encode()).digest()
    return tuple(np.uint64(int.from_bytes(digest[i : i + 8], "little")) for i in range(0, 32, 8))


def hash64(index: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64 of the counter ``index`` in the stream ``key``: uniform uint64 per element."""
    # uint64 arithmetic wraps by design; only numpy scalars (never used here) would warn.
    z = index.astype(np.uint64, copy=False) * _GAMMA + key
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def unit_floats(index: np.ndarray, key: np.uint64) -> np.ndarray:
    """Uniform floats in [0, 1), 53 random bits each."""
    return (hash64(index, key) >> _S11).astype(np.float64) * _TWO_POW_M53


def _uuid4_strings(hi: np.ndarray, lo: np.ndarray) -> list[str]:
    hi = (hi & np.uint64(0xFFFFFFFFFFFF0FFF)) | np.uint64(0x4000)  # version 4
    lo = (lo & np.uint64(0x3FFFFFFFFFFFFFFF)) | np.uint64(0x8000000000000000)  # RFC 4122 variant
    text = np.stack([hi, lo], axis=1).astype(">u8").tobytes().hex()
    return [
        f"{text[i:i + 8]}-{text[i + 8:i + 12]}-{text[i + 12:i + 16]}-{text[i + 16:i + 20]}-{text[i + 20:i + 32]}"
        for i in range(0, len(text), 32)
    ]


def _category(index, keys, params):
    values = params["values"]
    weights = params.get("weights")
    if weights is None:
        picks = (unit_floats(index, keys[0]) * len(values)).astype(np.int64)
    else:
        cumulative = np.cumsum(np.asarray(weights, dtype=np.float64))
        draws = unit_floats(index, keys[0]) * cumulative[-1]
        picks = np.searchsorted(cumulative, draws, side="right")
    # Rounding can land exactly on the upper edge; the last choice takes it.
    picks = np.minimum(picks, len(values) - 1)
    if all(type(v) is str for v in values):
        return np.asarray(values, dtype=object)[picks]
    return [values[i] for i in picks.tolist()]


def _integer(index, keys, params):
    low, high = params["low"], params["high"]
    span = high - low + 1
    h = hash64(index, keys[0])
    # The modulo bias is at most span / 2**64: invisible for any span one would sample from.
    offset = h if span >= 2**64 else h % np.uint64(span)
    # Adding in uint64 and reinterpreting is exact over the whole int64 range, no overflow.
    return (offset + np.uint64(low % 2**64)).view(np.int64)


def _uniform(index, keys, params):
    low, high = params["low"], params["high"]
    return low + unit_floats(index, keys[0]) * (high - low)


def _gaussian(index, keys, params):
    # Box-Muller on two independent streams; 1 - u lies in (0, 1], so the log is finite.
    radius = np.sqrt(-2.0 * np.log1p(-unit_floats(index, keys[0])))
    angle = (2.0 * math.pi) * unit_floats(index, keys[1])
    return params["mean"] + params["stddev"] * radius * np.cos(angle)


def _bernoulli(index, keys, params):
    return unit_floats(index, keys[0]) < params["p"]


def _uuid(index, keys, params):
    return _uuid4_strings(hash64(index, keys[0]), hash64(index, keys[1]))


def _datetime(index, keys, params):
    start = dt.datetime.fromisoformat(params["start"])
    end = dt.datetime.fromisoformat(params["end"])
    span_s = int((end - start).total_seconds())
    seconds = (unit_floats(index, keys[0]) * span_s).astype(np.int64)
    if start.tzinfo is None:
        base = np.datetime64(start.replace(microsecond=0), "s") + np.timedelta64(start.microsecond, "us")
        return (base + seconds.astype("timedelta64[s]")).astype(object).tolist()
    return [start + dt.timedelta(seconds=s) for s in seconds.tolist()]


_DRAW = {
    "category": _category,
    "integer": _integer,
    "uniform": _uniform,
    "gaussian": _gaussian,
    "bernoulli": _bernoulli,
    "uuid": _uuid,
    "datetime": _datetime,
}


class SamplerGenerator(Generator):
    """Root batch generator of one sampler column.

    ``generate(indexes)`` takes the global record indexes (an integer array, or a DataFrame whose
    index they are) and returns one value per index: a numpy array of plain dtype (int64,
    float64, bool, object of str) or a list of Python values (datetimes, mixed category values).
    """

    strategy = "batch"
    reads_indexes = True

    def __init__(self, column: SamplerColumn, config: PipelineConfig):
        self.name = column.name
        self.outputs = column.outputs
        self.kind = column.sampler
        self.params = dict(column.params)
        self._keys = derive_keys(config.seed, column.name)
        self._draw = _DRAW[column.sampler]

    def values_for(self, index: Any) -> Any:
        """The values of the records ``index`` (any integer sequence)."""
        return self._draw(np.asarray(index, dtype=np.uint64), self._keys, self.params)

    def generate(self, data: Any) -> Any:
        index = getattr(data, "index", None)
        return self.values_for(data if index is None else index.to_numpy(dtype=np.uint64))

    async def agenerate(self, data: Any) -> Any:
        # Microseconds of numpy work: a thread hop would cost more than the values.
        return self.generate(data)

    def __repr__(self) -> str:
        return f"SamplerGenerator({self.name!r}, {self.kind})"
