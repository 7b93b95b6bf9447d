"""What a batch generator receives: the DataFrame of a row group's live records, one column per
kind of value, with the dtypes and values the README promises (ints beside a missing value are
Int64, text is object holding str and None, anything else as pandas infers it)."""

from __future__ import annotations

import datetime as dt
import decimal

import pandas as pd
import pytest

from pipeline.engine.buffer import RowGroupBuffer

NA = pd.NA
#: column: (values of records 0-3, dtype of the whole row group's column, its values as read back)
KINDS = {
    "ints": ([1, 2, 3, 4], "int64", None),
    "ints_none": ([1, None, 3, 4], "Int64", [1, NA, 3, 4]),
    "floats_none": ([1.5, None, 3.0, 4.0], "float64", [1.5, float("nan"), 3.0, 4.0]),
    "int_float": ([1, 2.5, 3, 4], "float64", [1.0, 2.5, 3.0, 4.0]),
    "text": (["a", "b", "c", "d"], "object", None),
    "text_none": (["a", None, "c", "d"], "object", None),
    "bools": ([True, False, True, True], "bool", None),
    "bools_none": ([True, None, False, True], "object", None),
    "mixed": ([1, "a", 2.0, None], "object", None),
    "dicts": ([{"a": 1}, {"b": 2}, None, {"c": [1]}], "object", None),
    "beyond_int64": ([2**70, 1, 2, 3], "object", None),
    "int_bool": ([1, True, 0, False], "object", None),
    "dates": ([dt.date(2020, 1, i) for i in range(1, 5)], "object", None),
    "decimals": ([decimal.Decimal("1.5")] * 4, "object", None),
    "nones": ([None] * 4, "object", None),
}


@pytest.fixture(scope="module")
def buffer() -> RowGroupBuffer:
    b = RowGroupBuffer(3, 30, 4, [*KINDS, "datetimes"])
    for c, (values, _, _) in KINDS.items():
        b.cols[c][:] = values
    b.cols["datetimes"][:] = [dt.datetime(2020, 1, i) for i in range(1, 5)]
    return b


@pytest.mark.parametrize("column", list(KINDS))
def test_each_kind_of_column_has_its_dtype_and_its_values(buffer, column):
    values, dtype, read = KINDS[column]
    df = buffer.frame(range(4), [column])
    assert list(df.columns) == [column] and list(df.index) == [30, 31, 32, 33]
    assert str(df[column].dtype) == dtype
    got = df[column].tolist()
    assert [type(v) for v in got] == [type(v) for v in (read or values)]
    assert [repr(v) for v in got] == [repr(v) for v in (read or values)]


def test_records_left_out_keep_their_global_index_and_a_column_narrows_to_its_live_values(buffer):
    df = buffer.frame([1, 3], ["text_none", "ints_none", "mixed", "datetimes"])
    assert list(df.index) == [31, 33] and str(df.index.dtype) == "int64"
    assert df["text_none"].tolist() == [None, "d"] and str(df["text_none"].dtype) == "object"
    assert str(df["ints_none"].dtype) == "Int64" and df["ints_none"].isna().tolist() == [True, False]
    assert df["mixed"].tolist() == ["a", None] and str(df["mixed"].dtype) == "object"  # text with None
    assert str(df["datetimes"].dtype).startswith("datetime64") and df["datetimes"].iloc[1] == pd.Timestamp(2020, 1, 4)
