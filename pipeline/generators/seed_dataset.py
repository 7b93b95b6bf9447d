"""``seed_dataset`` columns: rows of a Parquet, CSV or JSONL file, one per record.

Which seed row a record takes is a function of its global record index only (and, for
``shuffle``, of the config seed and the entry name), so a resumed run neither replays nor skips a
seed row, whatever the row groups and workers did before.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pipeline.generators.base import Generator
from pipeline.generators.samplers import derive_keys, hash64

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig, SeedDatasetColumn

__all__ = ["SEED_FORMATS", "SeedDatasetGenerator", "read_seed_file", "resolve_seed_path", "shuffle_permutation"]

#: File name endings understood, and the reader of each.
SEED_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def resolve_seed_path(path: str, base_dir: Path) -> Path:
    """``path`` as the config means it: relative to the config file's folder."""
    return (Path(base_dir) / Path(path).expanduser()).resolve()


def _read(path: Path, kind: str) -> pd.DataFrame:
    if kind == "parquet":
        return pd.read_parquet(path)
    if kind == "csv":
        return pd.read_csv(path)
    # json rather than pandas.read_json: values stay as written, with no guessing of dates
    # from column names, whatever the pandas version.
    records = []
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError(f"line {number} is not a JSON object")
                records.append(record)
    return pd.DataFrame.from_records(records)


@functools.lru_cache(maxsize=8)
def _load(path: Path, mtime_ns: int, size: int, columns: tuple[str, ...]) -> pd.DataFrame:
    # Keyed on mtime and size so that validation and the generator share one read, and an edited
    # file is read again.
    kind = SEED_FORMATS[path.suffix.lower()]
    try:
        frame = _read(path, kind)
    except Exception as exc:
        raise ValueError(f"cannot read seed file {path} as {kind}: {exc}") from exc
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        have = ", ".join(map(str, frame.columns)) or "none"
        raise ValueError(
            f"seed file {path} has no column {', '.join(repr(c) for c in missing)} "
            f"(it has: {have}); fix 'columns'"
        )
    if len(frame) == 0:
        raise ValueError(f"seed file {path} has no rows; a seed dataset needs at least one")
    return frame.loc[:, list(columns)].reset_index(drop=True)


def read_seed_file(path: Path, columns: list[str] | tuple[str, ...]) -> pd.DataFrame:
    """The listed columns of a seed file, indexed 0..n-1.

    Raises FileNotFoundError, or ValueError for an unknown format, an unreadable file, a missing
    column or an empty file; each message says what to fix. The result is shared: do not mutate.
    """
    path = Path(path)
    if path.suffix.lower() not in SEED_FORMATS:
        raise ValueError(
            f"seed file {path} has an unknown format; name it *.parquet, *.csv or *.jsonl"
        )
    try:
        stat = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"seed file {path} does not exist; fix 'path' (relative to the config's folder)") from None
    if not path.is_file():
        raise FileNotFoundError(f"seed file {path} is not a file; fix 'path'")
    return _load(path, stat.st_mtime_ns, stat.st_size, tuple(columns))


def shuffle_permutation(n: int, seed: int, name: str) -> np.ndarray:
    """A permutation of range(n) fixed by (seed, name).

    Sorting counter-based hashes rather than drawing from numpy's Generator keeps it the same
    across numpy versions, so a run resumed after an upgrade still takes the same seed rows.
    """
    key = derive_keys(seed, f"seed_dataset:{name}")[0]
    return np.argsort(hash64(np.arange(n, dtype=np.uint64), key), kind="stable")


def file_digest(path: Path) -> str:
    """sha256 (hex) of the file's bytes. Kept per process while the file's size, modification
    time and inode stay the same, so that a run's fingerprints read a big seed file once."""
    stat = Path(path).stat()
    return _file_digest(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size, stat.st_ino)


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, mtime_ns: int, size: int, inode: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SeedDatasetGenerator(Generator):
    """Root batch generator: record i takes seed row i % n, or row perm[i % n] when shuffled."""

    strategy = "batch"

    def __init__(self, column: SeedDatasetColumn, config: PipelineConfig):
        self.name = column.name
        self.outputs = column.outputs
        self.frame = read_seed_file(resolve_seed_path(column.path, config.base_dir), column.columns)
        n = len(self.frame)
        self._rows = shuffle_permutation(n, config.seed, column.name) if column.order == "shuffle" else None

    def generate(self, data: Any) -> pd.DataFrame:
        index = data.index
        rows = index.to_numpy(dtype=np.int64) % len(self.frame)
        if self._rows is not None:
            rows = self._rows[rows]
        out = self.frame.iloc[rows]
        out.index = index
        return out

    async def agenerate(self, data: Any) -> pd.DataFrame:
        # A few hundred microseconds of indexing: cheaper on the loop than a thread hop.
        return self.generate(data)
