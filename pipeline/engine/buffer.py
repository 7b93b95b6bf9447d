"""Values of a live row group, column by column, and its Parquet file when it is finished.

Values are kept per column (one list of ``num_rows`` per output column) so a cell write is one
list store and a finished row group becomes an Arrow table without reshaping. A generator sees
only the columns it declared it reads (``depends_on``), never whatever else happens to be
there, so what it receives does not depend on timing.

Results enter through :meth:`RowGroupBuffer.prepare_cell` / :meth:`~RowGroupBuffer.prepare_batch`,
once, when their task finishes: each value becomes its canonical form and its JSON text
(pipeline.values). The buffer keeps the canonical value and the journal records the text, so an
uninterrupted run and a resumed one (which reloads the text) hold the same values. A value with
no exact stored form fails its own cell with an error naming column, record and why.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from pipeline.errors import UnstorableValueError
from pipeline.loaded import loaded
from pipeline.values import encode, prepare

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import pyarrow as pa

# numpy, pandas and pyarrow are imported where they are first needed (a batch generator's
# DataFrame, a finished row group's Parquet file), not with the engine: together they are about
# 250 ms of a `pipeline run`'s start on this machine, and a run's first tasks need none of them.

__all__ = ["JSON_FIELD", "RowGroupBuffer", "column_array", "normalize_batch", "normalize_cell", "write_parquet_atomic"]


class RowGroupBuffer:
    __slots__ = ("row_group", "start", "n", "cols")

    def __init__(self, row_group: int, start: int, num_rows: int, columns: Sequence[str]):
        self.row_group = row_group
        self.start = start  # global index of the first record
        self.n = num_rows
        self.cols: dict[str, list] = {c: [None] * num_rows for c in columns}

    def row(self, r: int, names: Sequence[str]) -> dict[str, Any]:
        cols = self.cols
        return {c: cols[c][r] for c in names}

    def indexes(self, rows: Sequence[int]) -> np.ndarray:
        """The global record indexes of the given records (row indexes), an int64 array: what a
        batch generator with ``reads_indexes`` receives."""
        import numpy as np

        if len(rows) == self.n:
            return np.arange(self.start, self.start + self.n, dtype=np.int64)
        return np.asarray(rows, dtype=np.int64) + self.start

    def frame(self, rows: Sequence[int], names: Sequence[str]) -> pd.DataFrame:
        """The given records (row indexes) as a DataFrame indexed by global record index (what a
        batch generator receives). A column of ints with missing values is Int64 (pd.NA); text is
        object dtype holding str and None (pandas 3's str dtype would turn None into NaN)."""
        import pandas as pd

        index = pd.RangeIndex(self.start, self.start + self.n) if len(rows) == self.n else \
            pd.Index([self.start + r for r in rows], dtype="int64")
        cols = self.cols
        if len(rows) == self.n:
            data = {c: _frame_column(cols[c], index) for c in names}
        else:
            data = {c: _frame_column([cols[c][r] for r in rows], index) for c in names}
        return pd.DataFrame(data, index=index, copy=False)

    def unstorable(self, column: str, r: int, exc: UnstorableValueError) -> UnstorableValueError:
        """The cell's error: which column, which record, and why (contract section 9)."""
        return UnstorableValueError(
            f"column '{column}', record {self.start + r} (row group {self.row_group}, row {r}): {exc}")

    def prepare_cell(self, outputs: Sequence[str], r: int, result: Any) -> tuple[Any, str]:
        """A cell task's result (a dict of its outputs when there are several, see
        :func:`normalize_cell`) as ``(canonical value, JSON text for the journal)``. Raises
        UnstorableValueError naming the column and the record."""
        if len(outputs) == 1:
            try:
                return prepare(result)
            except UnstorableValueError as exc:
                raise self.unstorable(outputs[0], r, exc) from None
        value, parts = {}, []
        for c in outputs:
            try:
                value[c], text = prepare(result[c])
            except UnstorableValueError as exc:
                raise self.unstorable(c, r, exc) from None
            parts.append(f'"{c}":{text}')  # column names are identifiers: nothing to escape
        return value, "{" + ",".join(parts) + "}"

    def prepare_batch(self, columns: Mapping[str, Sequence[Any]], rows: Sequence[int]
                      ) -> tuple[list[int], dict[str, list], dict[str, list[str]], dict[int, UnstorableValueError]]:
        """A batch task's result (:func:`normalize_batch`) made canonical, row by row: ``(rows,
        {column: values}, {column: JSON texts}, {row: error})``; a row whose value in some
        column has no exact stored form is left out of the first three and named in the last."""
        values: dict[str, list] = {}
        texts: dict[str, list[str]] = {}
        bad: dict[int, UnstorableValueError] = {}
        for c, vals in columns.items():
            out_v: list = []
            out_t: list = []
            values[c], texts[c] = out_v, out_t
            for r, v in zip(rows, vals):
                try:
                    v, t = prepare(v)
                except UnstorableValueError as exc:
                    bad.setdefault(r, self.unstorable(c, r, exc))
                    v, t = None, None
                out_v.append(v)
                out_t.append(t)
        if bad:
            keep = [i for i, r in enumerate(rows) if r not in bad]
            rows = [rows[i] for i in keep]
            values = {c: [vals[i] for i in keep] for c, vals in values.items()}
            texts = {c: [vals[i] for i in keep] for c, vals in texts.items()}
        return rows, values, texts, bad

    def put_cell(self, outputs: Sequence[str], r: int, value: Any) -> None:
        """``value`` as made by :meth:`prepare_cell`."""
        if len(outputs) == 1:
            self.cols[outputs[0]][r] = value
        else:
            for c in outputs:
                self.cols[c][r] = value[c]

    def put_batch(self, columns: Mapping[str, Sequence[Any]], rows: Sequence[int],
                  texts: Mapping[str, Sequence[str]]) -> str:
        """Write values of the given rows (from :meth:`prepare_batch`); return the JSON text of
        ``{column: [value per row]}`` over the whole row group (null elsewhere), which is what
        the journal records."""
        parts = []
        for c, vals in columns.items():
            col = self.cols[c]
            cells = ["null"] * self.n
            for r, v, t in zip(rows, vals, texts[c]):
                col[r] = v
                cells[r] = t
            parts.append(f'"{c}":[{",".join(cells)}]')
        return "{" + ",".join(parts) + "}"

    def restore(self, outputs: Sequence[str], r: int | None, value: Any) -> None:
        """Put back a value recorded by the journal (resume)."""
        if r is not None:
            self.put_cell(outputs, r, value)
        else:
            for c in outputs:
                self.cols[c][:] = value[c]

    def table(self, columns: Sequence[str], live: Sequence[int]) -> pa.Table:
        """Live records, columns in config order (see :func:`column_array`)."""
        import pyarrow as pa

        fields, arrays = [], []
        for c in columns:
            col = self.cols[c]
            array, as_json = column_array(col if len(live) == self.n else [col[r] for r in live])
            fields.append(pa.field(c, array.type, metadata=JSON_FIELD if as_json else None))
            arrays.append(array)
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


#: numpy dtypes of the columns whose values are all of one plain kind (pandas.api.types.infer_dtype,
#: no missing value): one array is built at once, without pandas' inference per value (about 2x
#: faster for a row group of 1,000, which a batch generator reads once per row group).
_PLAIN_KINDS = {"integer": "int64", "floating": "float64", "boolean": "bool", "string": "object"}


def _frame_column(values: list, index: pd.Index) -> pd.Series:
    """One column of :meth:`RowGroupBuffer.frame`: a Series over one typed array for a plain
    kind, else as pandas infers it, with ints beside a missing value as Int64 and text as object."""
    import numpy as np
    import pandas as pd
    from pandas.api.types import infer_dtype

    dtype = _PLAIN_KINDS.get(infer_dtype(values, skipna=False))
    if dtype is not None:
        try:
            return pd.Series(np.array(values, dtype=dtype), index=index, dtype=dtype, copy=False)
        except OverflowError:  # ints beyond 64 bits stay Python ints
            return pd.Series(values, index=index, dtype=object)
    series = pd.Series(values, index=index)
    if series.dtype == np.float64 and infer_dtype(values, skipna=True) == "integer":
        # Ints beside a missing value stay ints: pandas would make 1 and None 1.0 and NaN;
        # Int64 holds 1 and pd.NA.
        return pd.Series(pd.array(values, dtype="Int64"), index=index, copy=False)
    if isinstance(series.dtype, pd.StringDtype):
        return pd.Series(values, index=index, dtype=object)
    return series


#: Field metadata of a row-group file's column whose cells hold ``values.encode(value)``.
JSON_FIELD = {b"pipeline.json": b"1"}


#: Canonical types (pipeline.values) that an Arrow array gives back exactly, and datetimes
#: and times when naive (Arrow keeps one zone per column, and no offset of a time).
_NATIVE = frozenset({bool, int, float, str, bytes, dt.date, dt.timedelta})
_NATIVE_NAIVE = frozenset({dt.datetime, dt.time})


def column_array(values: list) -> tuple[pa.Array, bool]:
    """The Arrow array of one column of a row group, and whether its cells are JSON text.

    Canonical values of one type that Arrow holds exactly become a native array. Anything else
    is kept exactly as JSON text (pipeline.values): Arrow would fill the keys a dict lacks with
    nulls, turn ints into floats beside a float and datetimes into dates beside a date, give
    every Decimal the column's largest scale and every datetime the first one's zone, and
    cannot hold 1 and "x" in one column. Exports decode them (pipeline.dataset)."""
    import pyarrow as pa

    kinds = {type(v) for v in values}
    kinds.discard(type(None))
    kind = next(iter(kinds)) if len(kinds) == 1 else None
    if not kinds or kind in _NATIVE or (
            kind in _NATIVE_NAIVE and all(v is None or v.tzinfo is None for v in values)):
        try:
            return pa.array(values), False
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            pass  # ints beyond 64 bits
    return pa.array([None if v is None else encode(v) for v in values], type=pa.string()), True


def normalize_cell(outputs: Sequence[str], result: Any, name: str) -> Any:
    """One output: the value itself. Several: a dict with exactly these keys (extras ignored)."""
    if len(outputs) == 1:
        return result
    if not isinstance(result, Mapping):
        raise TypeError(f"generator '{name}' has outputs {list(outputs)} and must return a dict of them, "
                        f"got {type(result).__name__}")
    missing = [c for c in outputs if c not in result]
    if missing:
        raise KeyError(f"generator '{name}' did not return output(s) {missing}")
    return {c: result[c] for c in outputs}


def _as_list(vals: Any) -> list:
    # NumPy and pandas scalars left in the list become Python values in prepare_batch; tolist()
    # of datetime64[ns] values would give ints.
    if not hasattr(vals, "tolist") or getattr(getattr(vals, "dtype", None), "kind", None) in ("M", "m"):
        return list(vals)
    return vals.tolist()


def normalize_batch(outputs: Sequence[str], result: Any, expected: int, name: str) -> dict[str, list]:
    """A batch result as ``{column: list of expected length}``."""
    pd = loaded("pandas")  # a result cannot be a DataFrame before pandas is imported
    if pd is not None and isinstance(result, pd.DataFrame):
        if len(outputs) == 1 and outputs[0] not in result.columns:
            if len(result.columns) != 1:
                raise ValueError(f"generator '{name}' returned columns {list(result.columns)}; "
                                 f"expected a column '{outputs[0]}'")
            cols = {outputs[0]: _as_list(result.iloc[:, 0])}
        else:
            missing = [c for c in outputs if c not in result.columns]
            if missing:
                raise KeyError(f"generator '{name}' did not return output column(s) {missing}")
            cols = {c: _as_list(result[c]) for c in outputs}
    elif isinstance(result, Mapping) and len(outputs) > 1:
        missing = [c for c in outputs if c not in result]
        if missing:
            raise KeyError(f"generator '{name}' did not return output column(s) {missing}")
        cols = {c: _as_list(result[c]) for c in outputs}
    elif len(outputs) == 1 and not isinstance(result, (str, bytes, Mapping)) and hasattr(result, "__len__"):
        cols = {outputs[0]: _as_list(result)}
    else:
        raise TypeError(f"generator '{name}' (batch) must return one value per record "
                        f"(list, Series, array or DataFrame), got {type(result).__name__}")
    for c, vals in cols.items():
        if len(vals) != expected:
            raise ValueError(f"batch generator '{name}' returned {len(vals)} values for column '{c}' "
                             f"but the row group has {expected} live records")
    return cols


def write_parquet_atomic(table: pa.Table, path: str) -> tuple[int, str]:
    """Temporary name, fsync, rename, fsync the folder: the file is whole or absent. Returns
    its size in bytes and the SHA-256 digest (hex) of exactly the bytes written, which the
    checkpoint records so that readers can tell a damaged file. On failure nothing is left."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue()
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return data.size, hashlib.sha256(data).hexdigest()
