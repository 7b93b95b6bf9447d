"""Home folders with characters that mean something in a URL (space, %, %20, ?, #, non-ASCII):
the default state store is that folder's state.db, whatever its name, through every command."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import cli

CONFIG = textwrap.dedent("""\
    name: odd
    num_records: 12
    row_group_size: 5
    columns:
      - {name: id, type: sampler, sampler: uuid}
      - {name: n, type: sampler, sampler: integer, params: {low: 1, high: 9}}
      - {name: label, type: expression, expr: "n={{ n }}"}
    """)

ODD_NAMES = ["with space", "50%20off", "100%", "exp?a", "hash#tag", "ünïcødé-写真", "semi;colon&amp=x"]


def config(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(CONFIG)
    return path


@pytest.mark.parametrize("name", ODD_NAMES)
@pytest.mark.slow
def test_every_command_keeps_the_state_store_inside_an_oddly_named_home(tmp_path, name):
    home = tmp_path / name
    cli("run", str(config(tmp_path)), "--run-id", "r1", "--quiet", home=home, check=True)
    assert (home / "state.db").is_file()
    assert (home / "runs" / "r1").is_dir()
    # Nothing but the home folder and the config was created next to it.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cfg.yaml", name])
    status = json.loads(cli("status", "r1", "--json", home=home, check=True).stdout)
    assert status["status"] == "complete" and status["records_done"] == 12
    assert [r["run_id"] for r in json.loads(cli("runs", "--json", home=home, check=True).stdout)] == ["r1"]
    rows = json.loads(cli("sql", "select count(*) as n from row_groups", "--json", home=home, check=True).stdout)
    assert rows == [{"n": 3}]
    out = tmp_path / name / "out.csv"
    cli("export", "r1", "--output", str(out), home=home, check=True)
    assert len(pd.read_csv(out)) == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cfg.yaml", name])


@pytest.mark.slow
def test_homes_whose_names_differ_only_by_url_escapes_stay_separate(tmp_path):
    cfg = config(tmp_path)
    escaped, plain = tmp_path / "a%20b", tmp_path / "a b"
    cli("run", str(cfg), "--run-id", "same", "--quiet", home=escaped, check=True)
    # The same run id in the other home is a new run, not "already taken".
    cli("run", str(cfg), "--run-id", "same", "--quiet", "--num-records", "7", home=plain, check=True)
    assert (escaped / "state.db").is_file() and (plain / "state.db").is_file()
    for home, records in ((escaped, 12), (plain, 7)):
        runs = json.loads(cli("runs", "--json", home=home, check=True).stdout)
        assert [(r["run_id"], r["num_records"]) for r in runs] == [("same", records)]


@pytest.mark.slow
def test_a_db_url_given_as_text_still_works_with_escapes(tmp_path):
    """--db / PIPELINE_DB stay URLs: a path with '%', '?' or '#' is written escaped there."""
    folder = tmp_path / "db?x#y%z"
    url = f"sqlite:///{tmp_path}/db%3Fx%23y%25z/state.db"
    cli("run", str(config(tmp_path)), "--run-id", "r", "--quiet", home=tmp_path / "home", db=url, check=True)
    assert (folder / "state.db").is_file()
    assert json.loads(cli("status", "r", "--json", home=tmp_path / "home", db=url, check=True).stdout)["status"] == "complete"
