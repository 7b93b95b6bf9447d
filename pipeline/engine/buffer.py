"""Values of a live row group, column by column, and its Parquet file when it is finished.

Values are kept per column (one list of ``num_rows`` per output column) so a cell write is one
list store and a finished row group becomes an Arrow table without reshaping. A generator sees
only the columns it declared it reads (``depends_on``), never whatever else happens to be
there, so what it receives does not depend on timing.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Any, Mapping, Sequence

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.values import encode, to_python

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

    def frame(self, rows: Sequence[int], names: Sequence[str]) -> pd.DataFrame:
        """The given records (row indexes) as a DataFrame indexed by global record index."""
        index = pd.RangeIndex(self.start, self.start + self.n) if len(rows) == self.n else \
            pd.Index([self.start + r for r in rows], dtype="int64")
        cols = self.cols
        if len(rows) == self.n:
            data = {c: cols[c] for c in names}
        else:
            data = {c: [cols[c][r] for r in rows] for c in names}
        return pd.DataFrame(data, index=index)

    def put_cell(self, outputs: Sequence[str], r: int, value: Any) -> None:
        """``value`` as normalised by :func:`normalize_cell`."""
        if len(outputs) == 1:
            self.cols[outputs[0]][r] = value
        else:
            for c in outputs:
                self.cols[c][r] = value[c]

    def put_batch(self, columns: Mapping[str, Sequence[Any]], rows: Sequence[int]) -> dict[str, list]:
        """Write values of the given rows; return ``{column: [value per row]}`` over the whole row
        group (None elsewhere), which is what the journal records."""
        full = {}
        live = None if len(rows) == self.n else set(rows)
        for c, vals in columns.items():
            col = self.cols[c]
            for r, v in zip(rows, vals):
                col[r] = v
            full[c] = list(col) if live is None else [col[r] if r in live else None for r in range(self.n)]
        return full

    def restore(self, outputs: Sequence[str], r: int | None, value: Any) -> None:
        """Put back a value recorded by the journal (resume)."""
        if r is not None:
            self.put_cell(outputs, r, value)
        else:
            for c in outputs:
                self.cols[c][:] = value[c]

    def table(self, columns: Sequence[str], live: Sequence[int]) -> pa.Table:
        """Live records, columns in config order (see :func:`column_array`)."""
        fields, arrays = [], []
        for c in columns:
            col = self.cols[c]
            array, as_json = column_array(col if len(live) == self.n else [col[r] for r in live])
            fields.append(pa.field(c, array.type, metadata=JSON_FIELD if as_json else None))
            arrays.append(array)
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


#: Field metadata of a row-group file's column whose cells hold ``values.encode(value)``.
JSON_FIELD = {b"pipeline.json": b"1"}


def column_array(values: list) -> tuple[pa.Array, bool]:
    """The Arrow array of one column of a row group, and whether its cells are JSON text.

    Scalars of one Python type become a native array. Nested values (dicts, lists) and mixed
    types are kept exactly as JSON text instead: Arrow would fill the keys a dict lacks with
    nulls, turn ints into floats beside a float and datetimes into dates beside a date, and
    cannot hold 1 and "x" in one column. Exports decode them (pipeline.dataset)."""
    kinds = {type(v) for v in values}
    kinds.discard(type(None))
    if len(kinds) <= 1:
        try:
            array = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
            array = None
        if array is not None and not pa.types.is_nested(array.type):
            return array, False
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
    if isinstance(vals, pd.Series):
        if vals.dtype.kind in "OMm" or str(vals.dtype) in ("string", "category"):
            return [to_python(v) for v in vals.tolist()]
        return vals.tolist()
    if hasattr(vals, "tolist"):
        return vals.tolist()
    return [to_python(v) for v in vals]


def normalize_batch(outputs: Sequence[str], result: Any, expected: int, name: str) -> dict[str, list]:
    """A batch result as ``{column: list of expected length}``."""
    if isinstance(result, pd.DataFrame):
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
