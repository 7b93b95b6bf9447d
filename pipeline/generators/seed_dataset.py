"""``seed_dataset`` columns: rows of a Parquet, CSV or JSONL file, one per record.

Which seed row a record takes is a function of its global record index only (and, for
``shuffle``, of the config seed and the entry name), so a resumed run neither replays nor skips a
seed row, whatever the row groups and workers did before.

The file is read by :func:`pipeline.sources.read_seed_file`, values as written (contract section
10), a missing value None, never NaN.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.generators.base import Generator
from pipeline.generators.samplers import derive_keys, hash64
from pipeline.sources import read_seed_file, resolve_seed_path

if TYPE_CHECKING:
    from pipeline.config.models import PipelineConfig, SeedDatasetColumn

__all__ = ["SeedDatasetGenerator", "shuffle_permutation"]


def shuffle_permutation(n: int, seed: int, name: str) -> np.ndarray:
    """A permutation of range(n) fixed by (seed, name).

    Sorting counter-based hashes rather than drawing from numpy's Generator keeps it the same
    across numpy versions, so a run resumed after an upgrade still takes the same seed rows.
    """
    key = derive_keys(seed, f"seed_dataset:{name}")[0]
    return np.argsort(hash64(np.arange(n, dtype=np.uint64), key), kind="stable")


class SeedDatasetGenerator(Generator):
    """Root batch generator: record i takes seed row i % n, or row perm[i % n] when shuffled."""

    strategy = "batch"

    def __init__(self, column: SeedDatasetColumn, config: PipelineConfig):
        self.name = column.name
        self.outputs = column.outputs
        self.seed = read_seed_file(resolve_seed_path(column.path, config.base_dir), column.columns)
        n = len(self.seed)
        self._rows = shuffle_permutation(n, config.seed, column.name) if column.order == "shuffle" else None

    def generate(self, data: Any) -> pd.DataFrame:
        """The seed rows of the records in ``data.index``, as object columns of exact values."""
        index = data.index
        rows = index.to_numpy(dtype=np.int64) % len(self.seed)
        if self._rows is not None:
            rows = self._rows[rows]
        values = self.seed.take(rows)
        return pd.DataFrame({c: pd.Series(v, index=index, dtype=object) for c, v in values.items()}, index=index)

    async def agenerate(self, data: Any) -> pd.DataFrame:
        # A few hundred microseconds of indexing: cheaper on the loop than a thread hop.
        return self.generate(data)
