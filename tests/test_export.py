"""What `pipeline export` writes and `pipeline.load_dataset` returns, through the real command
line: every value as it was produced, whatever its type and wherever row groups start."""

from __future__ import annotations

import csv
import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

import pipeline
from tests.conftest import cli

FUNCTIONS = '''
def shape(row):
    """Values whose type depends on the record: dicts with other keys, lists, text, numbers."""
    n = int(row["n"])
    return [{"a": n}, {"b": "x", "c": [1, 2.5]}, [n, "y"], "text", n, n + 0.25, None, {"a": 1.5}][n % 8]
'''


def write(folder: Path, rg: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "shape_fns.py").write_text(FUNCTIONS)
    cfg = folder / "cfg.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: shapes
        num_records: 24
        row_group_size: {rg}
        seed: 5
        columns:
          - {{name: n, type: sampler, sampler: integer, params: {{low: 0, high: 1000}}}}
          - {{name: mixed, type: sampler, sampler: category, params: {{values: [1, "x", 2.5]}}}}
          - {{name: u, type: sampler, sampler: uniform, params: {{low: 0, high: 1}}}}
          - {{name: shape, type: python, function: "shape_fns:shape", requires: [n]}}
          - {{name: obj, type: expression, dtype: json, expr: '{{{{ {{"n": n, "half": n / 2}} | tojson }}}}'}}
        """))
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The same config run with row groups of 2 and of 7."""
    base = tmp_path_factory.mktemp("export")
    home = base / "home"
    for rg in (2, 7):
        cli("run", str(write(base / f"rg{rg}", rg)), "--run-id", f"rg{rg}", "--quiet", home=home, check=True)
    return {"home": home, "base": base}


def export(runs: dict, run_id: str, fmt: str) -> Path:
    out = runs["base"] / f"{run_id}.{fmt}"
    cli("export", run_id, "--output", str(out), home=runs["home"], check=True)
    return out


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expected_shape(n: int):
    return [{"a": n}, {"b": "x", "c": [1, 2.5]}, [n, "y"], "text", n, n + 0.25, None, {"a": 1.5}][n % 8]


@pytest.mark.slow
def test_jsonl_holds_every_value_exactly_and_does_not_depend_on_row_groups(runs):
    small, large = jsonl(export(runs, "rg2", "jsonl")), jsonl(export(runs, "rg7", "jsonl"))
    assert small == large and len(small) == 24
    for record in small:
        assert record["shape"] == expected_shape(record["n"])
        assert type(record["shape"]) is type(expected_shape(record["n"]))  # ints stay ints
        assert record["obj"] == {"n": record["n"], "half": record["n"] / 2}
        assert record["mixed"] in (1, "x", 2.5)
    assert {type(r["mixed"]) for r in small} <= {int, str, float}
    assert len({type(r["mixed"]) for r in small}) > 1, "the sample should mix the types"


@pytest.mark.slow
def test_load_dataset_returns_the_same_values_as_the_jsonl_export(runs):
    frame = pipeline.load_dataset("rg2", home=runs["home"])
    assert list(frame.columns) == ["n", "mixed", "u", "shape", "obj"]
    records = jsonl(export(runs, "rg2", "jsonl"))
    for (_, row), record in zip(frame.iterrows(), records):
        assert row["shape"] == record["shape"] and row["mixed"] == record["mixed"] and row["obj"] == record["obj"]
        assert row["u"] == record["u"]  # floats to the last bit, not 10 digits


@pytest.mark.slow
def test_floats_round_trip_exactly_in_jsonl_and_csv(runs):
    parquet = pd.read_parquet(export(runs, "rg7", "parquet"))
    from_jsonl = [r["u"] for r in jsonl(export(runs, "rg7", "jsonl"))]
    with export(runs, "rg7", "csv").open() as f:
        from_csv = [float(r["u"]) for r in csv.DictReader(f)]
    assert parquet["u"].tolist() == from_jsonl == from_csv
    assert any(len(repr(u)) > 14 for u in from_jsonl)  # the values do have more than 10 digits


@pytest.mark.slow
def test_csv_writes_dicts_and_lists_as_json_text(runs):
    with export(runs, "rg2", "csv").open() as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        assert json.loads(row["obj"]) == {"n": int(row["n"]), "half": int(row["n"]) / 2}
        shape = expected_shape(int(row["n"]))
        if isinstance(shape, (dict, list)):
            assert json.loads(row["shape"]) == shape


@pytest.mark.slow
def test_parquet_export_of_mixed_columns_is_one_file_whatever_the_row_groups(runs):
    small, large = pd.read_parquet(export(runs, "rg2", "parquet")), pd.read_parquet(export(runs, "rg7", "parquet"))
    pd.testing.assert_frame_equal(small, large)
    assert small["obj"].map(lambda v: v["n"]).tolist() == small["n"].tolist()  # dicts stay readable
