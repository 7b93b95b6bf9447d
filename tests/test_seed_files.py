"""Seed files that cannot be read as written (contract sections 3 and 10) are refused through the
real CLI with exit 2, naming the file, the column, the line where it helps and the fix, before
anything is created; odd but readable files (a byte-order mark, a column name pandas would rename)
give exactly what they hold."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import cli


def project(tmp_path: Path, seed_name: str, columns: str, records: int = 2) -> None:
    """cfg.yaml in tmp_path: one seed_dataset column 'people' over ``seed_name``."""
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent(f"""\
        name: seeds
        num_records: {records}
        seed: 1
        columns:
          - {{name: people, type: seed_dataset, path: {seed_name}, columns: [{columns}], order: sequential}}
        """))


def refused(tmp_path: Path, *expected: str) -> None:
    """``validate`` and ``run`` exit 2 with every text of ``expected`` on stderr; nothing is created."""
    home = tmp_path / "home"
    for command in ("validate", "run"):
        proc = cli(command, "cfg.yaml", home=home, cwd=tmp_path)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert "cfg.yaml" in proc.stderr and "column 'people'" in proc.stderr, proc.stderr
        for text in expected:
            assert text in proc.stderr, (text, proc.stderr)
    assert not home.exists()


def exported(tmp_path: Path) -> list[dict]:
    home = tmp_path / "home"
    cli("run", "cfg.yaml", "--run-id", "s", "--quiet", home=home, cwd=tmp_path, check=True)
    cli("export", "s", "--output", "out.jsonl", home=home, cwd=tmp_path, check=True)
    return [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("text, line, fields, fix", [
    # a spreadsheet's export with a trailing comma: pandas took 'name' as the index, giving
    # {"name": "Paris", "city": null}
    ("name,city\nAlice,Paris,\nBob,Rome,\n", 2, 3, "remove the trailing comma"),
    pytest.param("name,city\nAlice,Paris,,\n", 2, 4, "remove the trailing comma", marks=pytest.mark.slow),
    pytest.param("name,city\nAlice,Paris,extra\nBob,Rome\n", 2, 3, "'extra': quote a value that holds a comma",
                 marks=pytest.mark.slow),
    pytest.param("name,city\nAlice,Paris\nBob,Rome,x\n", 3, 3, "'x': quote a value that holds a comma",
                 marks=pytest.mark.slow),
])
def test_a_csv_line_with_more_fields_than_the_header_is_refused_naming_the_line(tmp_path, text, line, fields, fix):
    (tmp_path / "people.csv").write_text(text)
    project(tmp_path, "people.csv", "name, city")
    refused(tmp_path, "people.csv", f"line {line} has {fields} fields, the header 2 (name, city)", fix)


@pytest.mark.slow
def test_a_listed_column_the_header_names_twice_is_refused(tmp_path):
    (tmp_path / "people.csv").write_text("name,name,city\nAlice,Bob,Paris\n")
    project(tmp_path, "people.csv", "name, city")
    refused(tmp_path, "people.csv", "has 2 columns named 'name'", "rename them")


def test_a_parquet_column_named_twice_is_refused(tmp_path):
    pq.write_table(pa.Table.from_arrays([pa.array(["Alice"]), pa.array(["Bob"])], names=["name", "name"]),
                   tmp_path / "people.parquet")
    project(tmp_path, "people.parquet", "name")
    refused(tmp_path, "people.parquet", "has 2 columns named 'name'")


@pytest.mark.slow
def test_a_column_is_taken_by_the_name_the_header_gives_it_not_by_pandas_renaming(tmp_path):
    # pandas renames the header "a,a,a.1" to a, a.2, a.1: 'a.1' would have been the second column
    (tmp_path / "people.csv").write_text("a,a,a.1\n1,2,3\n")
    project(tmp_path, "people.csv", "a.1", records=1)
    assert exported(tmp_path) == [{"a.1": 3}]


@pytest.mark.parametrize("name, data, expected", [
    ("people.csv", b"name\nAlice\nJos\xe9\n", ["is not UTF-8: line 3 has the byte 0xe9", "seed files are UTF-8"]),
    ("people.jsonl", b'{"name": "Alice"}\n{"name": "Jos\xe9"}\n', ["is not UTF-8: line 2 has the byte 0xe9", "seed files are UTF-8"]),
    pytest.param("people.csv", "name\nJosé\n".encode("utf-16"), ["is UTF-16, not UTF-8", "iconv -f utf-16"],
                 marks=pytest.mark.slow),
])
def test_a_seed_file_that_is_not_utf8_is_refused_naming_its_line(tmp_path, name, data, expected):
    (tmp_path / name).write_bytes(data)
    project(tmp_path, name, "name")
    refused(tmp_path, name, *expected)


@pytest.mark.parametrize("name, data, expected", [
    ("people.csv", "", "is empty (no rows)"),
    ("people.jsonl", "", "is empty (no rows)"),
    ("people.jsonl", "\n\n", "is empty (no rows)"),
    pytest.param("people.csv", "name\n", "has no rows", marks=pytest.mark.slow),
])
def test_a_seed_file_without_rows_says_so_in_every_format(tmp_path, name, data, expected):
    (tmp_path / name).write_text(data)
    project(tmp_path, name, "name")
    refused(tmp_path, name, expected, "needs at least one row")


def test_a_jsonl_line_that_is_not_json_is_refused_naming_the_file_line(tmp_path):
    (tmp_path / "people.jsonl").write_text('{"name": "Alice"}\n\n{"name": "Bob",}\n')
    project(tmp_path, "people.jsonl", "name")
    refused(tmp_path, "people.jsonl", "line 3 is not valid JSON")


@pytest.mark.slow
def test_a_byte_order_mark_is_not_part_of_the_first_column_or_value(tmp_path):
    (tmp_path / "people.jsonl").write_bytes(b'\xef\xbb\xbf{"name": "Alice"}\n')
    project(tmp_path, "people.jsonl", "name", records=1)
    assert exported(tmp_path) == [{"name": "Alice"}]
    (tmp_path / "people.csv").write_bytes(b"\xef\xbb\xbfname,city\nAlice,Paris\n")
    project(tmp_path, "people.csv", "name, city", records=1)
    (tmp_path / "home").rename(tmp_path / "home.jsonl")
    assert exported(tmp_path) == [{"name": "Alice", "city": "Paris"}]


@pytest.mark.slow
def test_a_big_csv_column_of_numbers_with_text_far_down_is_text_throughout(tmp_path):
    # pandas guesses types per chunk of about 260,000 rows unless told to read the file whole:
    # the first chunk's ints and the last chunk's text would have been mixed in one column
    rows = 300_000
    (tmp_path / "people.csv").write_text("id,name\n" + "".join(f"{i},x\n" for i in range(rows)) + "NA,y\n")
    project(tmp_path, "people.csv", "id, name", records=2)
    assert exported(tmp_path) == [{"id": "0", "name": "x"}, {"id": "1", "name": "x"}]
