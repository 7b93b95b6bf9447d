"""The user's own inputs, as config validation, the fingerprints and the generators all reach them:
the python module a ``python`` column names, and the file a ``seed_dataset`` column reads.

Importing this module is cheap (no pandas, numpy or pyarrow): the config of a run with no seed
file never loads them. :func:`read_seed_file` loads them when it reads a file: pyarrow for
Parquet, pandas and pyarrow for CSV, neither for JSONL.

``function: "module:callable"`` is imported with the config file's folder on ``sys.path``, so a
``mymodule.py`` next to the config just works. Seed values are read as written (contract section
10): in CSV only an empty field is missing ("NA", "null", "NaN" are text), an int beside a missing
value stays an int in every format, and a missing value is None, never NaN.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import sys
import threading
from pathlib import Path
from typing import Any

from pipeline.loaded import loaded

__all__ = [
    "SEED_FORMATS",
    "SeedRows",
    "file_digest",
    "import_callable",
    "is_generator_class",
    "module_source_file",
    "read_seed_file",
    "resolve_seed_path",
]

# The user's python modules.

_path_lock = threading.Lock()


def _ensure_on_path(base_dir: Path) -> None:
    folder = str(Path(base_dir).resolve())
    with _path_lock:
        if folder not in sys.path:
            # First, so that the user's module wins over an installed one of the same name,
            # which is what "importable from the config's folder" promises.
            sys.path.insert(0, folder)
            importlib.invalidate_caches()


def import_callable(spec: str, base_dir: Path) -> Any:
    """The object ``spec`` ("module:attr" or "module:Class.attr") names.

    Raises ImportError with a message saying what is missing and where it was looked for.
    """
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ImportError(f"function '{spec}' must look like 'module:callable', e.g. 'mymodule:count_words'")
    _ensure_on_path(base_dir)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name) and module_name[len(exc.name) : len(exc.name) + 1] in ("", "."):
            raise ImportError(
                f"cannot import module '{module_name}': no {module_name.replace('.', '/')}.py in "
                f"{Path(base_dir).resolve()} nor an installed module of that name; "
                "put the module next to the config file or fix the name"
            ) from exc
        raise ImportError(f"importing module '{module_name}' failed: {exc}; install what it imports") from exc
    except Exception as exc:
        raise ImportError(
            f"importing module '{module_name}' failed: {type(exc).__name__}: {exc}; fix the module"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportError(
                f"module '{module_name}' ({getattr(module, '__file__', '?')}) has no attribute "
                f"'{attr_path}'; define it there or fix the name in 'function'"
            ) from exc
    if not callable(obj):
        raise ImportError(f"'{spec}' is a {type(obj).__name__}, not a function or a Generator class")
    return obj


def module_source_file(spec: str, base_dir: Path) -> Path | None:
    """The source file of the module ``spec`` names, when there is one (for the fingerprint)."""
    module_name = spec.partition(":")[0]
    _ensure_on_path(base_dir)
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
    except Exception:
        return None
    file = getattr(module, "__file__", None)
    if not file or not file.endswith(".py"):
        return None
    path = Path(file)
    return path if path.is_file() else None


def is_generator_class(obj: Any) -> bool:
    """True when ``obj`` is a subclass of :class:`pipeline.Generator`."""
    # A subclass exists only once the base class's module is loaded: ask pipeline.loaded
    # rather than importing it, which would make config validation depend on the generators.
    base = loaded("pipeline.generators.base")
    return base is not None and isinstance(obj, type) and issubclass(obj, base.Generator)


# Seed files.

#: File name endings understood, and the reader of each.
SEED_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def resolve_seed_path(path: str, base_dir: Path) -> Path:
    """``path`` as the config means it: relative to the config file's folder."""
    return (Path(base_dir) / Path(path).expanduser()).resolve()


class SeedRows:
    """The listed columns of a seed file, rows 0..n-1, kept as read (Arrow arrays, or for JSONL
    lists of the parsed values) and turned into Python values only for the rows a batch takes:
    every value exactly as written (an int beside a null stays an int, a null is None, a NaN
    written in a float column stays NaN, a struct's ints stay ints, a date a date)."""

    __slots__ = ("columns", "num_rows")

    def __init__(self, columns: dict[str, Any], num_rows: int) -> None:
        self.columns = columns  # {name: pyarrow.Array or list}
        self.num_rows = num_rows

    def __len__(self) -> int:
        return self.num_rows

    def take(self, rows: Any) -> dict[str, list]:
        """``{column: [value of each row in rows]}``; ``rows``: a numpy int64 array of positions 0..n-1."""
        out = {}
        positions = None
        for name, data in self.columns.items():
            if isinstance(data, list):
                positions = rows.tolist() if positions is None else positions
                out[name] = [data[i] for i in positions]
            else:
                # Arrow's own Python values (to_pandas would make ints beside a null 1.0 and NaN).
                out[name] = data.take(rows).to_pylist()
        return out


def _read(path: Path, kind: str, columns: tuple[str, ...]) -> tuple[list[str], dict[str, Any], int]:
    """``(every column name in the file, {listed column found: its values}, number of rows)``,
    values as written (README, "Seed datasets"): no NA guessing, a missing value is None."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in columns if c in names])
        return names, {c: table.column(c).combine_chunks() for c in table.column_names}, table.num_rows
    if kind == "csv":
        import pandas as pd
        import pyarrow as pa

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
    """The listed columns of a seed file (:class:`SeedRows`). Loads pyarrow for a Parquet file,
    pandas and pyarrow for a CSV one (see the module docstring).

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
