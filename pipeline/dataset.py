"""A run's dataset, read back from its row-group files: what ``export`` writes and
``load_dataset`` returns.

Each checkpointed row group is one Parquet file whose columns are native Arrow arrays, or JSON
text for nested, mixed and other values Arrow would not give back exactly (see
:func:`pipeline.engine.buffer.column_array`). A column that is native with one type in every
file is concatenated as Arrow. Any other column is read back as its exact Python values and
then given one representation for the whole dataset, so what comes out never depends on where
row groups start, nor on whether the run was interrupted (README, "Values"):

- ``load_dataset``: the exact values (dicts keep their keys, ints stay ints, an int column with
  missing values holds Python ints and None); native columns take pandas' types;
- JSONL: plain JSON: Decimals as numbers with their exact digits, bytes as base64 text, dates,
  times and datetimes as ISO 8601 text, durations as seconds, NaN and infinities as null;
- CSV: dates, times, datetimes, durations, bytes and Decimals as in JSONL, dicts and lists as
  JSON text, missing values (and NaN) as empty fields;
- Parquet: one Arrow type inferred over the whole column (dicts become structs, Decimals a
  decimal of the largest scale, tz-aware datetimes UTC timestamps), or, where the values have
  no common type, strings holding JSON text for the values that are not strings.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import io
import os
import secrets
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import simplejson

from pipeline.errors import DamagedFileError, ExportError
from pipeline.file_checks import check_files, content_problem, damage_message, os_problem
from pipeline.states import RowGroupState
from pipeline.store.base import Store
from pipeline.values import decode

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["Dataset", "FORMATS", "check_files", "read_dataset", "read_row_group"]

FORMATS = ("parquet", "csv", "jsonl")
#: The field metadata key that marks a row-group file's column of JSON cells: the format's own
#: constant (``pipeline.engine.buffer.JSON_FIELD`` writes it; a test checks they agree), so that
#: reading files does not import the engine, nor pandas through it.
_FLAG = b"pipeline.json"


class Dataset:
    """The checkpointed records of a run, in record order, columns in config order."""

    def __init__(self, columns: list[str], parts: list[pa.Table], complete: bool) -> None:
        self.columns = columns
        self.parts = parts
        self.complete = complete
        self.num_rows = sum(p.num_rows for p in parts)

    def _native(self, column: str) -> pa.DataType | None:
        """The column's Arrow type when every part holds it natively with that type (parts with
        no values at all, typed null, fit any type); else None."""
        types = set()
        for part in self.parts:
            field = part.schema.field(column)
            if field.metadata and _FLAG in field.metadata:
                return None
            if not pa.types.is_null(field.type):
                types.add(field.type)
        if len(types) > 1:
            return None
        return types.pop() if types else pa.null()

    def _chunks(self, column: str, kind: pa.DataType) -> list[pa.Array]:
        chunks = []
        for part in self.parts:
            data = part.column(column)
            chunks.extend(data.chunks if data.type == kind else [pa.nulls(len(data), kind)])
        return chunks

    def values(self, column: str) -> list:
        """The column's exact Python values."""
        out: list = []
        for part in self.parts:
            out.extend(_part_values(part, column))
        return out

    def arrow_column(self, column: str) -> pa.ChunkedArray | pa.Array:
        kind = self._native(column)
        if kind is not None:
            return pa.chunked_array(self._chunks(column, kind), type=kind)
        values = self.values(column)
        present = [v for v in values if v is not None]
        if present and all(type(v) is dt.datetime and v.tzinfo is not None for v in present):
            # Arrow keeps one zone per column: the same instants in UTC, whatever came first.
            utc = [None if v is None else v.astimezone(dt.timezone.utc) for v in values]
            return pa.array(utc, type=pa.timestamp("us", tz="UTC"))
        try:
            return pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, OverflowError):
            return pa.array([v if v is None or isinstance(v, str) else export_json(v) for v in values],
                            type=pa.string())

    def to_arrow(self) -> pa.Table:
        return pa.table({c: self.arrow_column(c) for c in self.columns})

    def to_pandas(self) -> pd.DataFrame:
        import pandas as pd  # only here and in CSV: a Parquet or JSONL export does without it

        data = {}
        for c in self.columns:
            kind = self._native(c)
            if kind is not None and (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
                # Text with missing values holds str and None (pandas 3's str dtype would give NaN).
                data[c] = pd.Series(pa.chunked_array(self._chunks(c, kind), type=kind).to_pylist(), dtype=object)
            elif kind is not None:
                # An int column with missing values holds ints and None, not floats and NaN.
                data[c] = pa.chunked_array(self._chunks(c, kind), type=kind).to_pandas(integer_object_nulls=True)
            else:
                data[c] = pd.Series(self.values(c), dtype=object)
        return pd.DataFrame(data, columns=self.columns)

    def records(self) -> Iterator[dict[str, Any]]:
        """One dict per record, exact values."""
        columns = [self.values(c) for c in self.columns]
        for row in zip(*columns):
            yield dict(zip(self.columns, row))

    def write(self, path: Path, fmt: str) -> None:
        """Write to a temporary name in the same folder, fsync, rename: ``path`` ends up whole,
        or unchanged (a previous export there survives a full disk); no temporary file is left.
        An OSError becomes ExportError naming the path.

        A symlink is followed: its target is what gets replaced. A path that is a FIFO, a
        device or a socket (``os.stat`` of the path as given, which follows links), or that
        is reached through /proc (``/dev/stdout``, ``/dev/fd/N``: an open file descriptor) is
        written into as it is, never replaced. A folder is refused."""
        path = Path(path)
        if writes_in_place(path):
            try:
                with open(path, "wb") as out:
                    self.write_to(out, fmt)
            except OSError as exc:
                raise ExportError(f"could not write {path}: {exc}") from exc
            return
        if path.is_symlink():
            path = Path(os.path.realpath(path))
        if path.is_dir():
            raise ExportError(f"could not write {path}: it is a folder; name a file (or pass --card for a folder)")
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            self._write_file(tmp, fmt)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError):
                raise ExportError(f"could not write {path}: {exc}; nothing was written there "
                                  "(a file that was there is unchanged)") from exc
            raise
        with contextlib.suppress(OSError):  # the rename is durable once the folder is synced
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def write_to(self, stream: BinaryIO, fmt: str) -> None:
        """Write to an open binary stream (a pipe, standard output), front to back: no seek, so a
        pipe will do. The stream is left open. OSError as the stream raises it."""
        if fmt == "parquet":
            pq.write_table(self.to_arrow(), stream)
            return
        text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
        try:
            self._write_text(text, fmt)
            text.flush()
        finally:
            text.detach()

    def _write_file(self, path: Path, fmt: str) -> None:
        # A path, not an open file, for Parquet: Arrow then writes with its own file, no Python
        # file object (and its GIL) in between.
        if fmt == "parquet":
            pq.write_table(self.to_arrow(), path)
            return
        with open(path, "w", encoding="utf-8", newline="") as out:
            self._write_text(out, fmt)

    def _write_text(self, out: Any, fmt: str) -> None:
        if fmt == "csv":
            frame = self.to_pandas()
            for c in self.columns:
                frame[c] = _csv_column(frame[c])
            frame.to_csv(out, index=False, lineterminator="\n")
        else:
            for record in self.records():
                out.write(export_json(record))
                out.write("\n")


def writes_in_place(path: Path) -> bool:
    """Whether an export to ``path`` writes into what is there instead of replacing it: a FIFO,
    a character or block device or a socket (``os.stat`` of the path as given, following links:
    ``/dev/stdout`` piped is a FIFO), or any path reached through /proc. ``/dev/stdout``,
    ``/dev/fd/1`` and ``/proc/self/fd/1`` name an open file descriptor; the text of its link
    (``pipe:[85512]``, or the file the shell opened) is no folder to put a temporary file in,
    and the shell's own descriptor must be what is written."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None
    if mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                             or stat.S_ISSOCK(mode)):
        return True
    current = os.path.abspath(path)
    for _ in range(40):  # the kernel's own bound on links followed
        folder = os.path.realpath(os.path.dirname(current))
        if folder == "/proc" or folder.startswith("/proc/"):
            return True
        here = os.path.join(folder, os.path.basename(current))
        if not os.path.islink(here):
            return False
        current = os.path.join(folder, os.readlink(here))
    return False


def read_dataset(store: Store, run_id: str, home: Path) -> Dataset:
    """The checkpointed records of the run. Each file is checked against the size and SHA-256
    digest its checkpoint recorded (files of older versions, with none recorded, only for
    being readable); DamagedFileError names every file that is missing or does not match."""
    store.get_run(run_id)  # RunNotFoundError for an unknown id
    columns = list(store.column_counts(run_id))  # config order
    groups = store.row_groups(run_id)
    parts, damaged = [], []
    for g in groups:
        if g["state"] != RowGroupState.CHECKPOINTED or not g["path"]:
            continue
        path = home / g["path"]
        try:
            data = path.read_bytes()
        except OSError as exc:
            data, problem = None, os_problem(exc)
        else:
            problem = content_problem(data, g)
        if problem is None:
            try:
                # ParquetFile, not read_table: the dataset layer under read_table imports pandas.
                parts.append(pq.ParquetFile(pa.BufferReader(_arrow_copy(data))).read())
            except (pa.ArrowException, OSError) as exc:
                problem = f"not a readable Parquet file ({exc})"
        if problem is not None:
            damaged.append({"row_group": g["row_group"], "path": str(path), "problem": problem})
    if damaged:
        raise DamagedFileError(damage_message(run_id, damaged, home))
    counts = store.row_group_counts(run_id)  # row groups not created yet are pending
    complete = counts[RowGroupState.CHECKPOINTED] == counts["total"]
    if not parts:
        parts = [pa.table({c: pa.array([], type=pa.null()) for c in columns})]
    return Dataset(columns, [p.select(columns) for p in parts], complete)


def _arrow_copy(data: bytes) -> pa.Buffer:
    """``data`` copied into memory Arrow owns. Arrow's reader threads may drop their last
    reference to the buffer they decoded after ``read()`` has returned; a buffer over Python
    bytes then takes the GIL from an Arrow thread, and when the interpreter is exiting that
    thread is ended inside a C++ destructor: std::terminate, and a finished export exited -6."""
    buf = pa.allocate_buffer(len(data))
    with pa.FixedSizeBufferWriter(buf) as out:
        out.write(data)
    return buf


def read_row_group(path: Path) -> dict[str, list]:
    """One row-group file as ``{column: [exact Python value per record in the file]}``, decoded
    as exports decode it (what `pipeline retry` puts back in the state store)."""
    table = pq.ParquetFile(path).read()
    return {c: _part_values(table, c) for c in table.column_names}


def _part_values(part: pa.Table, column: str) -> list:
    field = part.schema.field(column)
    data = part.column(column).to_pylist()
    if field.metadata and _FLAG in field.metadata:
        data = [None if v is None else decode(v) for v in data]
    return data


def export_json(value: Any) -> str:
    """Plain JSON text of an exact value, as JSONL and CSV write it (see the module docstring)."""
    return simplejson.dumps(value, ensure_ascii=False, ignore_nan=True, use_decimal=True, encoding=None,
                            default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    raise TypeError(f"cannot write a {type(value).__name__} as JSON")


def _csv_cell(value: Any) -> Any:
    """A value as CSV text: dates, times, durations, bytes and Decimals as JSONL writes them,
    dicts and lists as JSON text; None and NaN stay missing (an empty field)."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if value == value else None
    if isinstance(value, (dict, list)):
        return export_json(value)
    if isinstance(value, (dt.date, dt.time, dt.timedelta, bytes)):
        return _json_default(value)
    return str(value)  # a Decimal: its exact digits


def _csv_column(series: pd.Series) -> pd.Series:
    import pandas as pd

    # Built as object columns: Series.map would infer a type again (ints beside None -> 1.0).
    kind = series.dtype.kind
    if kind == "M":  # native timestamps: ISO 8601 as in JSONL, not pandas' "2024-01-01 00:00:00"
        cells = [None if pd.isna(t) else t.isoformat() for t in series]
    elif kind == "m":
        return series.dt.total_seconds()
    elif series.dtype == object:  # not pandas' own string dtype: its values are text already
        cells = [_csv_cell(v) for v in series]
    else:
        return series
    return pd.Series(cells, index=series.index, dtype=object)
