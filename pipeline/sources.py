"""The user's own inputs, as config validation, the fingerprints and the generators all reach them:
the python module a ``python`` column names, and the file a ``seed_dataset`` column reads.

Importing this module is cheap (no pandas, numpy or pyarrow): the config of a run with no seed
file never loads them. :func:`read_seed_file` loads them when it reads a file: pyarrow for
Parquet, pandas and pyarrow for CSV, neither for JSONL.

``function: "module:callable"`` is imported with the config file's folder on ``sys.path``, so a
``mymodule.py`` next to the config just works. Seed values are read as written (contract section
10): in CSV only an empty field is missing ("NA", "null", "NaN" are text), an int beside a missing
value stays an int in every format, and a missing value is None, never NaN. What cannot be read
as written is refused, naming the file and the line where it helps: a file that is not UTF-8, a
CSV line with more fields than the header, a listed column the file names twice.
"""

from __future__ import annotations

import csv
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


class _Refused(ValueError):
    """A seed file that cannot be read as written; the message names the file and says what to fix."""


def _read(path: Path, kind: str, columns: tuple[str, ...]) -> tuple[list[str], dict[str, Any], int]:
    """``(every column name in the file, {listed column found: its values}, number of rows)``,
    values as written (README, "Seed datasets"): no NA guessing, a missing value is None."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        _refuse_duplicates(path, names, columns)
        table = pq.read_table(path, columns=[c for c in columns if c in names])
        return names, {c: table.column(c).combine_chunks() for c in table.column_names}, table.num_rows
    if kind == "csv":
        return _read_csv(path, columns)
    # json rather than pandas.read_json: values stay as written, with no guessing of dates
    # from column names, whatever the pandas version.
    records = []
    # utf-8-sig: a byte-order mark some Windows tools write is not part of the first line's JSON.
    with open(path, encoding="utf-8-sig") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise _Refused(
                        f"seed file {path}: line {number} is not valid JSON ({exc.msg} at character "
                        f"{exc.colno}); a JSONL file holds one JSON object per line"
                    ) from None
                if not isinstance(record, dict):
                    raise _Refused(f"seed file {path}: line {number} is not a JSON object; a JSONL file holds one per line")
                records.append(record)
    names = list(dict.fromkeys(key for record in records for key in record))
    # The parsed values themselves; a key a record lacks is missing (None).
    found = {c: [r.get(c) for r in records] for c in columns if c in names}
    return names, found, len(records)


def _read_csv(path: Path, columns: tuple[str, ...]) -> tuple[list[str], dict[str, Any], int]:
    import pandas as pd
    import pyarrow as pa

    # The header as written: pandas renames a repeated name ("a", "a" become "a", "a.1") and an
    # empty one ("Unnamed: 2"), which would let 'columns' take a column the file does not name.
    header = _csv_header(path)
    if not header:
        return [], {}, 0
    _refuse_duplicates(path, header, columns)
    # Only an empty field is missing: "NA", "N/A", "null", "None", "NaN", "n/a", "#N/A", ...
    # are text. pandas' parser still reads a column whose every field is a number as numbers
    # (and true/false as booleans); a column with any other text is text. Its pyarrow
    # backend keeps an int column with empty fields as ints, and reads faster than the default.
    # low_memory=False: by default pandas guesses types per chunk of ~260,000 rows, so a big
    # file's column of numbers with text further down comes out as ints and strings mixed.
    options = {"keep_default_na": False, "na_values": [""], "low_memory": False}
    try:
        try:
            frame = pd.read_csv(path, dtype_backend="pyarrow", **options)
        except OverflowError:
            # pandas (3.x) cannot hand a column holding an int beyond 64 bits to Arrow; its
            # nullable NumPy backend reads it (as text, as written), a little slower.
            frame = pd.read_csv(path, dtype_backend="numpy_nullable", **options)
    except pd.errors.ParserError:
        # "Expected 2 fields in line 3, saw 3", or an unclosed quote: say which line and the fix.
        _refuse_long_rows(path, header)
        raise
    # A first data line with more fields than the header makes pandas take the first column(s)
    # as the index: every value moves one column left, the last column's go missing, with no
    # error. index_col=False would not do better (pandas drops the extra fields, a warning at
    # most), so the frame is checked instead, and such a file refused, naming the line.
    if not isinstance(frame.index, pd.RangeIndex) or len(frame.columns) != len(header):
        _refuse_long_rows(path, header)
        raise _Refused(f"seed file {path}: pandas read {len(frame.columns)} columns where the header names "
                       f"{len(header)}; check the file's commas and quotes")
    # By position: the frame's names are pandas' renamings of the header's.
    positions = [header.index(c) for c in columns if c in header]
    table = pa.Table.from_pandas(frame.iloc[:, positions], preserve_index=False)
    found = {header[p]: table.column(i).combine_chunks() for i, p in enumerate(positions)}
    return header, found, len(frame)


def _csv_rows(path: Path):
    """``(line number, fields)`` of each non-blank record of a CSV file, as pandas splits it."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, strict=False)
        for fields in reader:
            if fields:  # pandas skips blank lines
                yield reader.line_num, fields


def _csv_header(path: Path) -> list[str]:
    """The first record's fields ([] for a file with no record)."""
    for _, fields in _csv_rows(path):
        return fields
    return []


def _refuse_long_rows(path: Path, header: list[str]) -> None:
    """Raise _Refused naming the first data line with more fields than the header, if any."""
    rows = _csv_rows(path)
    try:
        next(rows)
        for number, fields in rows:
            if len(fields) > len(header):
                break
        else:
            return
    except csv.Error:  # a field over the csv module's size limit: leave pandas' message
        return
    extra = fields[len(header):]
    if all(not value.strip() for value in extra):
        fix = "the extra fields are empty: remove the trailing comma(s) at the end of the data lines"
    else:
        fix = (f"the extra value is {extra[0]!r}: quote a value that holds a comma (\"Paris, France\"), "
               "or add its column's name to the header")
    raise _Refused(
        f"seed file {path}: line {number} has {len(fields)} fields, the header {len(header)} "
        f"({', '.join(header)}); {fix}"
    )


def _refuse_duplicates(path: Path, names: list[str], columns: tuple[str, ...]) -> None:
    """A listed column the file names more than once is ambiguous: refuse it."""
    for c in columns:
        if names.count(c) > 1:
            raise _Refused(
                f"seed file {path} has {names.count(c)} columns named {c!r}; rename them in the file "
                "so that 'columns' says which one to take"
            )


def _not_utf8(path: Path) -> _Refused:
    """The message for a seed file that is not UTF-8, naming the first line that is not."""
    fix = 'seed files are UTF-8: save it as UTF-8 (in Excel: "CSV UTF-8"), or convert it, e.g. iconv -f {} -t utf-8'
    with open(path, "rb") as fh:
        if fh.read(2) in (b"\xff\xfe", b"\xfe\xff"):  # the byte-order mark of Excel's "Unicode text"
            return _Refused(f"seed file {path} is UTF-16, not UTF-8; {fix.format('utf-16')}")
        fix = fix.format("latin1")
        fh.seek(0)
        for number, line in enumerate(fh, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return _Refused(
                    f"seed file {path} is not UTF-8: line {number} has the byte 0x{line[exc.start]:02x} "
                    f"(byte {exc.start + 1} of the line); {fix}"
                )
    return _Refused(f"seed file {path} is not UTF-8; {fix}")


@functools.lru_cache(maxsize=8)
def _load(path: Path, mtime_ns: int, size: int, columns: tuple[str, ...]) -> SeedRows:
    # Keyed on mtime and size so that validation and the generator share one read, and an edited
    # file is read again.
    kind = SEED_FORMATS[path.suffix.lower()]
    try:
        names, found, num_rows = _read(path, kind, columns)
    except _Refused:
        raise
    except UnicodeDecodeError:
        raise _not_utf8(path) from None
    except Exception as exc:
        raise ValueError(f"cannot read seed file {path} as {kind}: {exc}") from exc
    if not names and not num_rows:
        raise ValueError(f"seed file {path} is empty (no rows); a seed dataset needs at least one row")
    missing = [c for c in columns if c not in found]
    if missing:
        have = ", ".join(names) or "none"
        raise ValueError(
            f"seed file {path} has no column {', '.join(repr(c) for c in missing)} "
            f"(it has: {have}); fix 'columns'"
        )
    if num_rows == 0:
        raise ValueError(f"seed file {path} has no rows, only column names; a seed dataset needs at least one row")
    return SeedRows({c: found[c] for c in columns}, num_rows)


def read_seed_file(path: Path, columns: list[str] | tuple[str, ...]) -> SeedRows:
    """The listed columns of a seed file (:class:`SeedRows`). Loads pyarrow for a Parquet file,
    pandas and pyarrow for a CSV one (see the module docstring).

    Raises FileNotFoundError, or ValueError for an unknown format, an unreadable file (not UTF-8,
    a CSV line with more fields than the header, a line of JSONL that is not a JSON object), a
    listed column missing or named twice, or a file without rows; each message says what to fix. The result is shared: do not mutate.
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
