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
import pyarrow as pa
import pyarrow.parquet as pq

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
    """The whole file, values as written (README, "Seed datasets"): no NA guessing, and a
    missing value is a missing value (None once stored), never a NaN that turns ints into floats."""
    if kind == "parquet":
        return _frame(pq.read_table(path))
    if kind == "csv":
        # Only an empty field is missing: "NA", "N/A", "null", "None", "NaN", "n/a", "#N/A", ...
        # are text. pandas' parser still reads a column whose every field is a number as numbers
        # (and true/false as booleans); its pyarrow backend keeps an int column with empty
        # fields as ints, and reads faster than the default.
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""], dtype_backend="pyarrow")
        return _frame(pa.Table.from_pandas(frame, preserve_index=False))
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
    # Object columns of the parsed values themselves: a DataFrame built from the records would
    # make {"n": 1} and {"n": null} 1.0 and NaN. A key a record lacks is missing (None).
    names = dict.fromkeys(key for record in records for key in record)
    return pd.DataFrame({name: pd.Series([r.get(name) for r in records], dtype=object) for name in names},
                        index=pd.RangeIndex(len(records)))


#: Arrow integer and boolean types and the pandas types that hold them beside missing values.
_NULLABLE = {
    pa.int8(): pd.Int8Dtype(), pa.int16(): pd.Int16Dtype(), pa.int32(): pd.Int32Dtype(),
    pa.int64(): pd.Int64Dtype(), pa.uint8(): pd.UInt8Dtype(), pa.uint16(): pd.UInt16Dtype(),
    pa.uint32(): pd.UInt32Dtype(), pa.uint64(): pd.UInt64Dtype(), pa.bool_(): pd.BooleanDtype(),
}


def _frame(table: pa.Table) -> pd.DataFrame:
    """An Arrow table as the columns the generator indexes: every value exact, every null one
    missing value (pd.NA or None, both stored as None), and quick to take rows from (NumPy
    or pandas' masked arrays; Arrow-backed pandas columns take ~30 times longer per batch)."""
    return pd.DataFrame({name: _column(table.column(name)) for name in table.column_names},
                        index=pd.RangeIndex(table.num_rows))


def _column(data: pa.ChunkedArray) -> Any:
    kind = data.type
    if pa.types.is_dictionary(kind):  # a Parquet categorical: its values
        return _column(data.cast(kind.value_type))
    if pa.types.is_integer(kind) or pa.types.is_boolean(kind):
        # Ints stay ints beside a null: Int64 and pd.NA, not float64 and NaN.
        return data.to_pandas(types_mapper=_NULLABLE.get) if data.null_count else data.to_pandas()
    if pa.types.is_floating(kind) and not data.null_count:
        return data.to_pandas()
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        values = data.to_numpy(zero_copy_only=False)  # str and None
    else:
        # Arrow's own Python values: a null is None and a NaN stays NaN in a float column, a
        # struct's ints stay ints, dates stay dates (to_pandas would make 1.0, NaN, datetime64).
        values = data.to_pylist()
    return pd.Series(values, dtype=object)


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
