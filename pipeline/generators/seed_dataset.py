"""``seed_dataset`` columns: rows of a Parquet, CSV or JSONL file, one per record.

Which seed row a record takes is a function of its global record index only (and, for
``shuffle``, of the config seed and the entry name), so a resumed run neither replays nor skips a
seed row, whatever the row groups and workers did before.

Values are read as written (contract section 10): in CSV only an empty field is missing ("NA",
"null", "NaN" are text), an int beside a missing value stays an int in every format, and a
missing value is None, never NaN.
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

__all__ = ["SEED_FORMATS", "SeedDatasetGenerator", "SeedRows", "read_seed_file", "resolve_seed_path", "shuffle_permutation"]

#: File name endings understood, and the reader of each.
SEED_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def resolve_seed_path(path: str, base_dir: Path) -> Path:
    """``path`` as the config means it: relative to the config file's folder."""
    return (Path(base_dir) / Path(path).expanduser()).resolve()


class SeedRows:
    """The listed columns of a seed file, rows 0..n-1, kept as read (Arrow arrays, or for JSONL
    the parsed values) and turned into Python values only for the rows a batch takes: every
    value exactly as written (an int beside a null stays an int, a null is None, a NaN written
    in a float column stays NaN, a struct's ints stay ints, a date a date)."""

    __slots__ = ("columns", "num_rows")

    def __init__(self, columns: dict[str, pa.Array | list], num_rows: int) -> None:
        self.columns = columns
        self.num_rows = num_rows

    def __len__(self) -> int:
        return self.num_rows

    def take(self, rows: np.ndarray) -> dict[str, list]:
        """``{column: [value of each row in rows]}``; ``rows`` are positions 0..n-1 (int64)."""
        out = {}
        positions = None
        for name, data in self.columns.items():
            if isinstance(data, pa.Array):
                # Arrow's own Python values (to_pandas would make ints beside a null 1.0 and NaN).
                out[name] = data.take(rows).to_pylist()
            else:
                positions = rows.tolist() if positions is None else positions
                out[name] = [data[i] for i in positions]
        return out


def _read(path: Path, kind: str, columns: tuple[str, ...]) -> tuple[list[str], dict[str, Any], int]:
    """``(every column name in the file, {listed column found: its values}, number of rows)``,
    values as written (README, "Seed datasets"): no NA guessing, a missing value is None."""
    if kind == "parquet":
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in columns if c in names])
        return names, {c: table.column(c).combine_chunks() for c in table.column_names}, table.num_rows
    if kind == "csv":
        # Only an empty field is missing: "NA", "N/A", "null", "None", "NaN", "n/a", "#N/A", ...
        # are text. pandas' parser still reads a column whose every field is a number as numbers
        # (and true/false as booleans); a column with any other text is text. Its pyarrow
        # backend keeps an int column with empty fields as ints, and reads faster than the default.
        options = {"keep_default_na": False, "na_values": [""]}
        try:
            frame = pd.read_csv(path, dtype_backend="pyarrow", **options)
        except OverflowError:
            # pandas (3.x) cannot hand a column holding an int beyond 64 bits to Arrow; its
            # nullable NumPy backend reads it (as text, as written), a little slower.
            frame = pd.read_csv(path, dtype_backend="numpy_nullable", **options)
        names = [str(c) for c in frame.columns]
        found = [c for c in columns if c in frame.columns]
        table = pa.Table.from_pandas(frame.loc[:, found], preserve_index=False)
        return names, {c: table.column(c).combine_chunks() for c in found}, len(frame)
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
    names = list(dict.fromkeys(key for record in records for key in record))
    # The parsed values themselves; a key a record lacks is missing (None).
    found = {c: [r.get(c) for r in records] for c in columns if c in names}
    return names, found, len(records)


@functools.lru_cache(maxsize=8)
def _load(path: Path, mtime_ns: int, size: int, columns: tuple[str, ...]) -> SeedRows:
    # Keyed on mtime and size so that validation and the generator share one read, and an edited
    # file is read again.
    kind = SEED_FORMATS[path.suffix.lower()]
    try:
        names, found, num_rows = _read(path, kind, columns)
    except Exception as exc:
        raise ValueError(f"cannot read seed file {path} as {kind}: {exc}") from exc
    missing = [c for c in columns if c not in found]
    if missing:
        have = ", ".join(names) or "none"
        raise ValueError(
            f"seed file {path} has no column {', '.join(repr(c) for c in missing)} "
            f"(it has: {have}); fix 'columns'"
        )
    if num_rows == 0:
        raise ValueError(f"seed file {path} has no rows; a seed dataset needs at least one")
    return SeedRows({c: found[c] for c in columns}, num_rows)


def read_seed_file(path: Path, columns: list[str] | tuple[str, ...]) -> SeedRows:
    """The listed columns of a seed file (:class:`SeedRows`).

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
