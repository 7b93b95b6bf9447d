"""Seed files are read as written (contract section 10): through the real CLI, a CSV, a JSONL and
a Parquet seed with NA-like text, ints beside missing values and empty fields give exactly those
values to python columns (cell and batch mode), to templates and to every export."""

from __future__ import annotations

import csv
import datetime as dt
import json
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import cli

#: (country, code, n, note): None is a missing value (an empty CSV field, JSON null, Parquet null).
ROWS = [
    ("Namibia", "NA", 1, "N/A"),
    ("France", "FR", None, "null"),
    ("Nowhere", None, 3, "None"),
    ("Chad", "TD", 4, "NaN"),
    ("Nepal", "n/a", None, "nan"),
    ("Niger", "#N/A", 6, "NULL"),
    ("Nauru", "<NA>", 7, "-NaN"),
    ("Norway", "null", 8, None),
    ("Oman", "None", 9, "1.#QNAN"),
    ("Peru", "NaN", 10, "#N/A N/A"),
]
NAMES = ("country", "code", "n", "note")

FNS = '''
def seen(row):
    return " ".join(f"{k}={type(row[k]).__name__}:{row[k]!r}" for k in ("code", "n", "note"))


def batch_seen(df):
    return [f"{df['n'].dtype}|{type(v).__name__}:{v!r}" for v in df["n"].tolist()]
'''


def write_seed(folder: Path, fmt: str) -> str:
    """The seed file of ROWS in ``fmt``; returns its name."""
    if fmt == "csv":
        lines = [",".join(NAMES)] + [",".join("" if v is None else str(v) for v in row) for row in ROWS]
        (folder / "countries.csv").write_text("\n".join(lines) + "\n")
        return "countries.csv"
    if fmt == "jsonl":
        (folder / "countries.jsonl").write_text(
            "".join(json.dumps(dict(zip(NAMES, row))) + "\n" for row in ROWS))
        return "countries.jsonl"
    columns = list(zip(*ROWS))
    pq.write_table(pa.table({
        "country": pa.array(columns[0], pa.string()), "code": pa.array(columns[1], pa.string()),
        "n": pa.array(columns[2], pa.int64()), "note": pa.array(columns[3], pa.string())}),
        folder / "countries.parquet")
    return "countries.parquet"


def run_seed(tmp_path: Path, fmt: str) -> tuple[Path, Path]:
    """Run a pipeline over the seed file; returns (config folder, home)."""
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "seen_fns.py").write_text(FNS)
    seed = write_seed(folder, fmt)
    (folder / "cfg.yaml").write_text(textwrap.dedent(f"""\
        name: seeds
        num_records: {len(ROWS)}
        row_group_size: {len(ROWS)}
        seed: 1
        columns:
          - {{name: seed, type: seed_dataset, path: {seed}, columns: [country, code, n, note], order: sequential}}
          - {{name: seen, type: python, function: "seen_fns:seen", requires: [code, n, note]}}
          - {{name: batch_seen, type: python, function: "seen_fns:batch_seen", mode: batch, requires: [n]}}
          - {{name: label, type: expression, expr: "{{{{ country }}}} ({{{{ code }}}})"}}
          - {{name: n_is_none, type: expression, expr: "{{{{ n is none }}}}"}}
        """))
    home = tmp_path / "home"
    cli("run", str(folder / "cfg.yaml"), "--run-id", "s", "--quiet", home=home, check=True)
    return folder, home


def export(home: Path, fmt: str) -> Path:
    out = home.parent / f"out.{fmt}"
    if not out.exists():
        cli("export", "s", "--output", str(out), "--format", fmt, home=home, check=True)
    return out


def jsonl_records(home: Path) -> list[dict]:
    return [json.loads(line) for line in export(home, "jsonl").read_text().splitlines()]


def described(value) -> str:
    return f"{type(value).__name__}:{value!r}"


@pytest.fixture(scope="module", params=["csv", pytest.param("jsonl", marks=pytest.mark.slow),
                                        pytest.param("parquet", marks=pytest.mark.slow)])
def seeded(request, tmp_path_factory) -> Path:
    """The home of one run over the seed file in each format (shared by this module's tests)."""
    _, home = run_seed(tmp_path_factory.mktemp(request.param), request.param)
    return home


def test_seed_values_reach_the_jsonl_export_as_written(seeded):
    home = seeded
    records = jsonl_records(home)
    assert [tuple(r[k] for k in NAMES) for r in records] == ROWS
    # ints stay ints beside a null: 1, not 1.0
    assert [type(r["n"]) for r in records] == [type(row[2]) for row in ROWS]
    assert "1.0" not in export(home, "jsonl").read_text()


def test_seed_values_reach_the_parquet_export_with_their_types(seeded):
    home = seeded
    table = pq.read_table(export(home, "parquet"))
    assert table.schema.field("n").type == pa.int64()
    assert table.schema.field("code").type == pa.string()
    assert table.schema.field("note").type == pa.string()
    assert list(zip(*(table.column(k).to_pylist() for k in NAMES))) == ROWS


def test_seed_values_reach_the_csv_export_as_written(seeded):
    home = seeded
    with open(export(home, "csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [tuple(r[k] for k in NAMES) for r in rows] == [
        tuple("" if v is None else str(v) for v in row) for row in ROWS]


def test_a_python_cell_function_receives_seed_values_as_written(seeded):
    home = seeded
    records = jsonl_records(home)
    expected = [" ".join(f"{k}={described(v)}" for k, v in zip(("code", "n", "note"), row[1:])) for row in ROWS]
    assert [r["seen"] for r in records] == expected
    assert records[1]["seen"] == "code=str:'FR' n=NoneType:None note=str:'null'"


def test_a_python_batch_function_receives_ints_beside_missing_values_as_ints(seeded):
    home = seeded
    records = jsonl_records(home)
    assert [r["batch_seen"] for r in records] == [
        "Int64|NAType:<NA>" if row[2] is None else f"Int64|int:{row[2]}" for row in ROWS]


def test_templates_see_na_text_as_text_and_a_missing_value_as_none(seeded):
    home = seeded
    records = jsonl_records(home)
    assert records[0]["label"] == "Namibia (NA)"
    assert records[9]["label"] == "Peru (NaN)"
    assert [r["n_is_none"] for r in records] == [str(row[2] is None) for row in ROWS]


@pytest.mark.slow
def test_a_csv_column_with_any_text_stays_text_as_written(tmp_path):
    folder = tmp_path / "cfg"
    folder.mkdir()
    (folder / "mixed.csv").write_text("score,amount\n1,2.5\nNA,\n3,1e3\n")
    (folder / "cfg.yaml").write_text(textwrap.dedent("""\
        name: mixed
        num_records: 3
        seed: 1
        columns:
          - {name: seed, type: seed_dataset, path: mixed.csv, columns: [score, amount], order: sequential}
        """))
    home = tmp_path / "home"
    cli("run", str(folder / "cfg.yaml"), "--run-id", "s", "--quiet", home=home, check=True)
    cli("export", "s", "--output", str(home / "out.jsonl"), home=home, check=True)
    records = [json.loads(line) for line in (home / "out.jsonl").read_text().splitlines()]
    # a column with "NA" in it is all text, as written; an all-numeric one is numbers, its empty
    # field missing (not NaN)
    assert [r["score"] for r in records] == ["1", "NA", "3"]
    assert [r["amount"] for r in records] == [2.5, None, 1000.0]


def run_small(tmp_path: Path, seed_name: str, columns: str, records: int) -> list[dict]:
    """Run a pipeline of one seed_dataset column over ``seed_name`` (in tmp_path/cfg); the JSONL export."""
    folder = tmp_path / "cfg"
    (folder / "cfg.yaml").write_text(textwrap.dedent(f"""\
        name: small
        num_records: {records}
        seed: 1
        columns:
          - {{name: seed, type: seed_dataset, path: {seed_name}, columns: [{columns}], order: sequential}}
        """))
    home = tmp_path / "home"
    cli("run", str(folder / "cfg.yaml"), "--run-id", "s", "--quiet", home=home, check=True)
    cli("export", "s", "--output", str(tmp_path / "out.jsonl"), home=home, check=True)
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_csv_with_an_int_beyond_64_bits_is_read_with_its_other_columns_as_written(tmp_path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "big.csv").write_text("big,n,code\n99999999999999999999,1,NA\n1,,null\n")
    records = run_small(tmp_path, "big.csv", "big, n, code", 2)
    assert records == [{"big": "99999999999999999999", "n": 1, "code": "NA"},
                        {"big": "1", "n": None, "code": "null"}]


@pytest.mark.slow
def test_parquet_seed_values_keep_nan_nulls_dates_and_struct_ints_apart(tmp_path):
    (tmp_path / "cfg").mkdir()
    pq.write_table(pa.table({
        "f": pa.array([1.5, float("nan"), None]),
        "day": pa.array([dt.date(2024, 2, 29), None, dt.date(2000, 1, 1)]),
        "st": pa.array([{"a": 1}, None, {"a": 2}]),
        "cat": pa.array(["x", None, "NA"]).dictionary_encode(),
    }), tmp_path / "cfg" / "values.parquet")
    records = run_small(tmp_path, "values.parquet", "f, day, st, cat", 3)
    # JSONL has no NaN (null, as for every export of NaN); the exported Parquet keeps it
    assert records == [{"f": 1.5, "day": "2024-02-29", "st": {"a": 1}, "cat": "x"},
                       {"f": None, "day": None, "st": None, "cat": None},
                       {"f": None, "day": "2000-01-01", "st": {"a": 2}, "cat": "NA"}]
    cli("export", "s", "--output", str(tmp_path / "out.parquet"), home=tmp_path / "home", check=True)
    table = pq.read_table(tmp_path / "out.parquet")
    f = table.column("f").to_pylist()
    assert f[0] == 1.5 and f[1] != f[1] and f[2] is None  # NaN stays NaN, null stays null
    assert table.schema.field("day").type == pa.date32()
    assert table.column("st").to_pylist() == [{"a": 1}, None, {"a": 2}]
