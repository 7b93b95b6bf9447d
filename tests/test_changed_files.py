"""Changed files are never mixed in silently (CONTRACT section 9): a python module or seed file
edited between an interrupted run and its resume refuses `resume`/`worker` with exit 2 naming the
file, changing nothing; `--accept-changes` goes on and records the change in `run_changes`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import signal
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import FilesChangedError
from pipeline.fingerprints import COLUMN, FILE, check_changed_files, fingerprints
from pipeline.store.base import ColumnSpec, NewRun
from tests.conftest import cli, cli_env, cli_popen, logged_pipeline, read_calls


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def status(run_id: str, home: Path) -> dict:
    s = json.loads(cli("status", run_id, "--json", home=home, check=True).stdout)
    return {k: s[k] for k in ("status", "records_done", "records_dropped", "columns", "row_groups")}


def sql(query: str, home: Path) -> list[dict]:
    return json.loads(cli("sql", query, "--json", home=home, check=True).stdout)


def interrupt_after(args: list[str], home: Path, env: dict, calls: Path, n: int, expect: int = 143) -> None:
    """Start `pipeline ARGS`, SIGTERM it once its column ``up`` made ``n`` more calls (counting
    every column's calls would let the fast sync column ``pair`` reach ``n`` alone)."""
    def ups() -> int:
        return sum(1 for column, _ in read_calls(calls) if column == "up")

    target = ups() + n
    proc = cli_popen(*args, "--quiet", home=home, env=env)
    deadline = time.monotonic() + 60
    while ups() < target:
        assert proc.poll() is None, f"the run ended before it was interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == expect, err


def slow_env(calls: Path, sleep_s: float = 0.03) -> dict:
    return cli_env(PIPELINE_TEST_CALLS=str(calls), PIPELINE_TEST_SLEEP=str(sleep_s))


@pytest.mark.slow
def test_an_edited_module_refuses_resume_and_worker_until_accepted_and_the_change_is_recorded(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=200, rg=50, in_flight=8)
    module = cfg.parent / "logged_fns.py"
    home, calls = tmp_path / "home", tmp_path / "calls"
    env = slow_env(calls)
    interrupt_after(["run", str(cfg), "--run-id", "edited"], home, env, calls, 40)
    stored = ("select kind, name, digest, (select count(*) from run_changes) as changes from run_fingerprints "
              "where run_id = 'edited' order by kind, name")
    recorded = sql(stored, home)
    assert [(r["name"], r["digest"]) for r in recorded if r["kind"] == FILE] == [(str(module.resolve()), sha256(module))]
    assert {r["name"] for r in recorded if r["kind"] == COLUMN} == {"id", "n", "word", "up", "len", "pair", "total",
                                                                   "label"}
    before = status("edited", home)
    assert before["status"] == "interrupted"

    module.write_text(module.read_text().replace(".upper()", ".lower()"))
    for command in ("resume", "worker"):
        proc = cli(command, "edited", "--quiet", home=home, env=env)
        assert proc.returncode == 2, proc.stderr
        assert f"{module.resolve()} (python module of columns 'up', 'len', 'pair', 'total'): changed" in proc.stderr
        assert "--accept-changes" in proc.stderr and "Traceback" not in proc.stderr
    assert status("edited", home) == before, "a refused resume changes nothing"
    assert sql(stored, home) == recorded

    proc = cli("resume", "edited", "--accept-changes", "--quiet", home=home, env=slow_env(calls, 0.002))
    assert proc.returncode == 0, proc.stderr
    assert "--accept-changes" in proc.stderr and str(module.resolve()) in proc.stderr
    changes = sql("select c.*, f.digest as recorded_now from run_changes c join run_fingerprints f "
                  "on f.run_id = c.run_id and f.kind = 'file' and f.name = c.name", home)
    assert len(changes) == 1, changes
    change = changes[0]
    assert (change["run_id"], change["kind"], change["name"]) == ("edited", FILE, str(module.resolve()))
    old_digest = next(r["digest"] for r in recorded if r["kind"] == FILE)
    assert change["old_digest"] == old_digest and change["new_digest"] == change["recorded_now"] == sha256(module)
    assert change["detail"].startswith("changed")
    # Recorded cells were kept, the rest computed with the module as it is now: both versions.
    out = tmp_path / "edited.jsonl"
    cli("export", "edited", "--output", str(out), home=home, check=True)
    ups = [json.loads(line)["up"] for line in out.read_text().splitlines()]
    assert len(ups) == 200 and any(u[:3].isupper() for u in ups) and any(u[:3].islower() for u in ups)


@pytest.mark.slow
def test_an_edited_seed_file_refuses_resume_and_an_unchanged_one_does_not(tmp_path):
    folder = tmp_path / "p"
    cfg = logged_pipeline(folder, records=200, rg=50, in_flight=8)
    seed = folder / "words.csv"
    seed.write_text("word2\nant\nbee\ncat\n")
    cfg.write_text(cfg.read_text().replace(
        "columns:\n", "columns:\n  - {name: seeds, type: seed_dataset, path: words.csv, columns: [word2]}\n"))
    home, calls = tmp_path / "home", tmp_path / "calls"
    env = slow_env(calls)
    interrupt_after(["run", str(cfg), "--run-id", "seeded"], home, env, calls, 40)
    # Unchanged files: resume goes on (interrupted again, later).
    interrupt_after(["resume", "seeded"], home, env, calls, 40)
    before = status("seeded", home)

    seed.write_text("word2\nant\nbee\ncow\n")
    proc = cli("resume", "seeded", "--quiet", home=home, env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"{seed.resolve()} (seed file of column 'seeds'): changed" in proc.stderr
    assert str((folder / "logged_fns.py").resolve()) not in proc.stderr, "only the changed file is named"
    assert status("seeded", home) == before

    proc = cli("resume", "seeded", "--accept-changes", "--quiet", home=home, env=slow_env(calls, 0.002))
    assert proc.returncode == 0, proc.stderr
    assert [(c["name"], c["new_digest"]) for c in sql("select * from run_changes", home)] == [
        (str(seed.resolve()), sha256(seed))]


# -- the fingerprints themselves (in-process) ------------------------------------------------------
def own_pipeline(folder: Path) -> Path:
    """logged_pipeline with its module under a name of its own: a module imported by an earlier
    test of this process would stand in for it (imports are cached by name)."""
    cfg = logged_pipeline(folder)
    name = f"fns_{uuid.uuid4().hex[:12]}"
    (folder / "logged_fns.py").rename(folder / f"{name}.py")
    cfg.write_text(cfg.read_text().replace("logged_fns:", f"{name}:"))
    return cfg


def module_of(cfg) -> Path:
    return Path(cfg.base_dir) / f"{cfg.columns[3].function.split(':')[0]}.py"


def test_a_module_edit_changes_the_fingerprint_of_its_column_and_of_every_column_downstream(tmp_path):
    cfg_path = own_pipeline(tmp_path / "p")
    before = fingerprints(load_config(cfg_path))
    module = module_of(load_config(cfg_path))
    module.write_text(module.read_text().replace("async def upper", "async def upper_old") + textwrap.dedent("""
        async def upper(row):
            return row["word"].upper()
        """))
    after = fingerprints(load_config(cfg_path))
    changed = {name for (kind, name), digest in after.items() if before.get((kind, name)) != digest}
    # The module holds the functions of up, len, pair and total: those change, and label reads total.
    assert changed == {str(module.resolve()), "up", "len", "pair", "total", "label"}
    assert all(before[(COLUMN, c)] == after[(COLUMN, c)] for c in ("id", "n", "word"))


def test_num_records_and_settings_do_not_change_column_fingerprints(tmp_path):
    cfg = load_config(own_pipeline(tmp_path / "p"))
    assert fingerprints(cfg) == fingerprints(cfg.with_num_records(7))


def _new_run(run_id: str, prints: dict) -> NewRun:
    return NewRun(run_id=run_id, name="t", num_records=4, row_group_size=2, seed=0, config="{}", fingerprint="f",
                  columns=[ColumnSpec("x", "x", "cell", 0)],
                  fingerprints=[(k, n, d) for (k, n), d in prints.items()])


def test_check_changed_files_refuses_then_accepts_on_every_store(tmp_path, any_store):
    cfg = load_config(own_pipeline(tmp_path / "p"))
    run_id = f"fp-{time.time_ns()}"
    any_store.create_run(_new_run(run_id, fingerprints(cfg)))
    stored = any_store.run_fingerprints(run_id)
    assert check_changed_files(any_store, run_id, cfg) == []

    module = module_of(cfg)
    module.write_text(module.read_text() + "\n# edited\n")
    with pytest.raises(FilesChangedError, match=module.name):
        check_changed_files(any_store, run_id, cfg)
    assert any_store.run_fingerprints(run_id) == stored

    [change] = check_changed_files(any_store, run_id, cfg, accept_changes=True)
    assert (change.name, change.what, change.readers) == (str(module.resolve()), "changed", ("up", "len", "pair", "total"))
    assert any_store.run_fingerprints(run_id) == fingerprints(cfg) != stored
    assert check_changed_files(any_store, run_id, cfg) == []


def test_a_run_recorded_without_fingerprints_gets_them_at_its_first_check(tmp_path, any_store):
    cfg = load_config(own_pipeline(tmp_path / "p"))
    run_id = f"old-{time.time_ns()}"
    any_store.create_run(dataclasses.replace(_new_run(run_id, {}), fingerprints=()))
    assert any_store.run_fingerprints(run_id) == {}
    assert check_changed_files(any_store, run_id, cfg) == []
    assert any_store.run_fingerprints(run_id) == fingerprints(cfg)
