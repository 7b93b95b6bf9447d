"""`pipeline run FILE --reuse RUN_ID` (CONTRACT section 11): a new run takes from an earlier run
of the same store every cell it would compute identically (same column fingerprint, same record)
and computes the rest; the earlier run may be incomplete and is not changed. The call log of the
python columns proves which cells ran; every export equals a fresh run's."""

from __future__ import annotations

import json

import pytest

from tests.test_changed_config import COLUMNS, Runner, interrupt, per_column, write_config


# -- run --reuse ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_reuse_takes_every_unchanged_cell_from_a_complete_run(tmp_path):
    r = Runner(tmp_path)
    cfg = write_config(tmp_path / "p")
    r("run", str(cfg), "--run-id", "src", "--quiet")
    r.take()
    new = write_config(tmp_path / "p", "new.yaml", records=120,
                       columns={**COLUMNS, "tag": COLUMNS["tag"].replace("#", "@")})
    proc = r("run", str(new), "--run-id", "dst", "--reuse", "src", "--quiet")
    assert "reused from run src" in proc.stderr
    calls = r.take()
    ran = per_column(calls)
    # after reads the changed tag: all of it; the rest only for the 20 records src does not have
    assert ran == {"after": 120, "up": 20, "len": 20, "total": 1}, ran
    assert r.export("dst") == r.fresh(new, "fresh")
    assert r.status("src")["num_records"] == 100  # the earlier run is not changed


@pytest.mark.slow
def test_reuse_takes_what_an_interrupted_run_has_and_copes_with_other_row_groups(tmp_path):
    r = Runner(tmp_path, sleep_s=0.01)
    cfg = write_config(tmp_path / "p", in_flight=4)
    interrupt(r, ["run", str(cfg), "--run-id", "half"], ups=50)
    r.take()
    done = r.status("half")["columns"]
    assert 0 < done["up"]["done"] < 100
    r("run", str(cfg), "--run-id", "again", "--reuse", "half", "--quiet")
    ran = per_column(r.take())
    assert ran["up"] == 100 - done["up"]["done"] and ran["after"] == 100 - done["after"]["done"]
    assert r.export("again") == r.fresh(cfg, "fresh")
    # Row groups cut otherwise: cells are taken by record index, batch columns computed.
    other = write_config(tmp_path / "p", "rg.yaml", rg=40)
    r("run", str(other), "--run-id", "cut", "--reuse", "again", "--quiet")
    assert per_column(r.take()) == {"total": 3}
    assert r.export("cut") == r.fresh(other, "fresh-cut")  # total sums per row group: its own values


def test_reuse_of_an_unknown_run_creates_nothing(tmp_path):
    r = Runner(tmp_path)
    cfg = write_config(tmp_path / "p")
    r("run", str(cfg), "--run-id", "one", "--quiet")
    proc = r("run", str(cfg), "--run-id", "two", "--reuse", "nope", code=2)
    assert "nope" in proc.stderr
    assert [x["run_id"] for x in json.loads(r("runs", "--json").stdout)] == ["one"]
