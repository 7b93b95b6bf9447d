"""Changing a run (CONTRACT section 11): `pipeline resume RUN_ID --config FILE [--plan]` recomputes
exactly the cells of changed columns and their readers, keeps the rest, grows or shrinks the run;
`pipeline run FILE --reuse RUN_ID` (tests/test_reuse_cells.py) takes every cell it would compute
identically from an earlier run. Python columns append a line per computed cell to a call log: it proves which cells ran, and
each `--plan` is checked against it. Afterwards every export equals a fresh run's."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import cli, cli_env, cli_popen, read_calls

pytestmark = pytest.mark.slow  # every test runs the command line several times

MOD_UP = '''
import os

def _log(col, key):
    fd = os.open(os.environ["PIPELINE_TEST_CALLS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{col},{key}\\n".encode())
    finally:
        os.close(fd)


async def upper(row):
    import asyncio
    await asyncio.sleep(float(os.environ.get("PIPELINE_TEST_SLEEP", "0")))
    _log("up", row["id"])
    return row["word"].upper() + "-" + row["id"][:4]
'''

MOD_REST = '''
from mod_up import _log

def length(row):
    _log("len", row["id"])
    return len(row["up"]) + row["n"]

def after(row):
    _log("after", row["id"])
    return row["tag"] + "/" + row["id"][:2]

def extra(row):
    _log("extra", row["id"])
    return row["up"].lower()

def picky(row):
    _log("picky", row["id"])
    if "word" not in row and row["n"] % 10 == 0:
        raise ValueError(f"picky about {row['n']}")
    return row["n"] * 2

def total(df):
    _log("total", df.index[0])
    return df["len"].cumsum().tolist()
'''

COLUMNS = {
    "id": "{name: id, type: sampler, sampler: uuid}",
    "n": "{name: n, type: sampler, sampler: integer, params: {low: 0, high: 100}}",
    "word": "{name: word, type: sampler, sampler: category, params: {values: [ant, bee, cat, dog]}}",
    "up": '{name: up, type: python, function: "mod_up:upper", requires: [word, id]}',
    "len": '{name: len, type: python, function: "mod_rest:length", requires: [up, n, id]}',
    "tag": '{name: tag, type: expression, expr: "{{ word }}#{{ n }}"}',
    "after": '{name: after, type: python, function: "mod_rest:after", requires: [tag, id]}',
    "total": '{name: total, type: python, function: "mod_rest:total", mode: batch, requires: [len]}',
}
LOGGED = ("up", "len", "after", "total", "extra", "picky")


def write_config(folder: Path, name: str = "cfg.yaml", *, records: int = 100, rg: int = 25,
                 columns: dict | None = None, in_flight: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "mod_up.py").exists():
        (folder / "mod_up.py").write_text(MOD_UP)
        (folder / "mod_rest.py").write_text(MOD_REST)
    entries = "\n".join(f"  - {c}" for c in (columns or COLUMNS).values())
    path = folder / name
    path.write_text(f"name: changed\nnum_records: {records}\nrow_group_size: {rg}\nseed: 5\n"
                    f"settings: {{max_in_flight_tasks: {in_flight}, max_concurrent_row_groups: 2}}\n"
                    f"columns:\n{entries}\n")
    return path


class Runner:
    """The CLI with one home folder and one call log; ``take()`` the calls since the last take."""

    def __init__(self, tmp_path: Path, db: str | None = None, sleep_s: float = 0.0):
        self.home, self.calls, self.db = tmp_path / "home", tmp_path / "calls", db
        self.env = cli_env(PIPELINE_TEST_CALLS=str(self.calls), PIPELINE_TEST_SLEEP=str(sleep_s))
        self.seen = 0

    def __call__(self, *args: str, code: int | None = 0):
        proc = cli(*args, home=self.home, db=self.db, env=self.env, timeout=300)
        if code is not None:
            assert proc.returncode == code, f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def take(self) -> list[tuple[str, str]]:
        calls = read_calls(self.calls)
        new, self.seen = calls[self.seen:], len(calls)
        return new

    def export(self, run_id: str) -> list[dict]:
        out = self.home.parent / f"{run_id}-{time.monotonic_ns()}.jsonl"
        self("export", run_id, "--output", str(out))
        return [json.loads(line) for line in out.read_text().splitlines()]

    def fresh(self, cfg: Path, run_id: str) -> list[dict]:
        """The export of a fresh run of ``cfg`` (its calls are not counted)."""
        self("run", str(cfg), "--run-id", run_id, "--quiet")
        self.take()
        return self.export(run_id)  # export makes no call

    def plan(self, run_id: str, cfg: Path) -> dict:
        out = json.loads(self("resume", run_id, "--config", str(cfg), "--plan", "--json").stdout)
        assert set(out) == {"columns"}
        return out["columns"]

    def status(self, run_id: str) -> dict:
        return json.loads(self("status", run_id, "--json").stdout)

    def sql(self, query: str) -> list[dict]:
        return json.loads(self("sql", query, "--json").stdout)


def per_column(calls) -> Counter:
    return Counter(column for column, _ in calls)


def assert_plan_ran(plan: dict, calls, rg_calls: dict | None = None) -> None:
    """Every logged cell column computed exactly the cells its plan said; batch columns as told."""
    ran = per_column(calls)
    for column in ("up", "len", "after", "extra", "picky"):
        if column in plan:
            assert ran[column] == plan[column]["compute"], (column, plan[column], ran)
    for column, n in (rg_calls or {}).items():
        assert ran[column] == n, (column, ran)


def interrupt(r: Runner, args: list[str], ups: int) -> None:
    """Start `pipeline ARGS`, SIGTERM it once column ``up`` made ``ups`` more calls."""
    def count() -> int:
        return sum(1 for c, _ in read_calls(r.calls) if c == "up")

    target = count() + ups
    proc = cli_popen(*args, "--quiet", home=r.home, db=r.db, env=r.env)
    deadline = time.monotonic() + 120
    while count() < target:
        assert proc.poll() is None, f"the run ended before it was interrupted: {proc.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err


# -- resume --config ---------------------------------------------------------------------------
def test_a_changed_template_recomputes_only_it_and_its_readers(tmp_path):
    r = Runner(tmp_path)
    cfg = write_config(tmp_path / "p")
    r("run", str(cfg), "--run-id", "a", "--quiet")
    assert per_column(r.take()) == {"up": 100, "len": 100, "after": 100, "total": 4}
    new = write_config(tmp_path / "p", "new.yaml", columns={**COLUMNS, "tag": COLUMNS["tag"].replace("#", "@")})
    plan = r.plan("a", new)
    assert plan["tag"] == {"keep": 0, "compute": 100, "reason": "entry changed (expr)"}
    assert plan["after"] == {"keep": 0, "compute": 100, "reason": "reads a changed column: tag"}
    for column in ("id", "n", "word", "up", "len", "total"):
        assert plan[column] == {"keep": 100, "compute": 0, "reason": "unchanged"}
    assert r.take() == [] and r.status("a")["changes"] == []  # the plan changed nothing
    proc = r("resume", "a", "--config", str(new), "--quiet")
    assert "entry changed (expr)" in proc.stderr
    calls = r.take()
    assert per_column(calls) == {"after": 100}
    assert_plan_ran(plan, calls)
    assert r.export("a") == r.fresh(new, "fresh")
    status = r("status", "a").stdout
    assert "config changed 1 time(s)" in status and "computed again: after, tag" in status
    changes = r.sql("select kind, name, old_digest, new_digest, detail from run_changes where run_id = 'a' "
                    "order by change_id")
    assert [(c["kind"], c["name"]) for c in changes] == [("config", str(new)), ("column", "tag"), ("column", "after")]
    assert all(c["old_digest"] and c["new_digest"] and c["old_digest"] != c["new_digest"] for c in changes)
    assert changes[1]["detail"] == "entry changed (expr); 100 recorded cells discarded, 100 to compute"
    # The new fingerprints are the run's: the same config again changes nothing.
    assert all(c["reason"] == "unchanged" and c["compute"] == 0 for c in r.plan("a", new).values())


def test_a_changed_module_on_an_interrupted_run_recomputes_its_column_and_readers_only(tmp_path):
    r = Runner(tmp_path, sleep_s=0.01)
    cfg = write_config(tmp_path / "p", in_flight=4)
    interrupt(r, ["run", str(cfg), "--run-id", "m"], ups=65)
    r.take()
    s = r.status("m")
    assert s["status"] == "interrupted" and 0 < s["row_groups"]["checkpointed"] < 4
    module = tmp_path / "p" / "mod_up.py"
    module.write_text(MOD_UP.replace(".upper()", ".title()"))
    plan = r.plan("m", cfg)
    for column in ("up", "len", "total"):
        assert plan[column]["keep"] == 0 and plan[column]["compute"] == 100, plan
    assert plan["up"]["reason"] == "python module changed"
    assert plan["len"]["reason"] == "reads a changed column: up"
    after_done = s["columns"]["after"]["done"]
    assert plan["after"] == {"keep": after_done, "compute": 100 - after_done, "reason": "unchanged"}
    assert plan["tag"]["keep"] == s["columns"]["tag"]["done"]
    r("resume", "m", "--config", str(cfg), "--quiet")
    calls = r.take()
    assert_plan_ran(plan, calls, {"total": 4})
    assert r.export("m") == r.fresh(cfg, "fresh")


def test_a_changed_judge_rubric_sends_only_judge_requests_again(tmp_path, fake_server):
    from tests.llm_run_helpers import RUBRIC, server_stats, three_columns_config

    url = fake_server(latency_ms=2)
    cfg = three_columns_config(tmp_path / "p", url, records=60)
    r = Runner(tmp_path)
    r("run", str(cfg), "--run-id", "j", "--quiet")
    first = server_stats(url)["models"]
    assert first["judge-model"]["requests"] == 60 and first["writer-model"]["requests"] == 120
    rubric = {**RUBRIC, "tone": "Is the tone fair?"}
    text = cfg.read_text().replace(json.dumps(RUBRIC), json.dumps(rubric))
    new = cfg.with_name("new.yaml")
    new.write_text(text)
    plan = r.plan("j", new)
    assert plan["grade"] == {"keep": 0, "compute": 60, "reason": "entry changed (rubric)"}
    assert all(plan[c] == {"keep": 60, "compute": 0, "reason": "unchanged"} for c in ("id", "topic", "review", "facts"))
    r("resume", "j", "--config", str(new), "--quiet")
    second = server_stats(url)["models"]
    assert second["writer-model"]["requests"] == 120  # not one writer request again
    assert second["judge-model"]["requests"] == 60 + 60
    rows = r.export("j")
    assert len(rows) == 60 and all(set(row["grade"]) == set(rubric) for row in rows)
    assert rows == r.fresh(new, "fresh")


def test_an_added_column_is_computed_alone_and_a_removed_one_leaves_the_export(tmp_path):
    r = Runner(tmp_path)
    cfg = write_config(tmp_path / "p")
    r("run", str(cfg), "--run-id", "x", "--quiet")
    r.take()
    added = write_config(tmp_path / "p", "added.yaml", columns={
        **COLUMNS, "extra": '{name: extra, type: python, function: "mod_rest:extra", requires: [up, id]}'})
    plan = r.plan("x", added)
    assert plan["extra"] == {"keep": 0, "compute": 100, "reason": "new column"}
    assert all(plan[c]["compute"] == 0 for c in COLUMNS)
    r("resume", "x", "--config", str(added), "--quiet")
    calls = r.take()
    assert per_column(calls) == {"extra": 100}
    assert r.export("x") == r.fresh(added, "fresh-added")

    removed = write_config(tmp_path / "p", "removed.yaml",
                           columns={k: v for k, v in COLUMNS.items() if k not in ("after", "extra")})
    plan = r.plan("x", removed)
    assert "after" not in plan and "extra" not in plan
    assert all(c["compute"] == 0 and c["keep"] == 100 for c in plan.values())
    text = r("resume", "x", "--config", str(removed), "--plan").stdout
    assert "after" in text and "removed from the config" in text
    r("resume", "x", "--config", str(removed), "--quiet")
    assert r.take() == []
    rows = r.export("x")
    assert "after" not in rows[0] and "extra" not in rows[0]
    assert rows == r.fresh(removed, "fresh-removed")
    assert list(r.status("x")["columns"]) == ["id", "n", "word", "up", "len", "tag", "total"]


def test_records_dropped_by_a_changed_columns_failures_come_back(tmp_path):
    r = Runner(tmp_path)
    picky = '{name: picky, type: python, function: "mod_rest:picky", requires: [n, id]}'
    columns = {**COLUMNS, "picky": picky, "label": '{name: label, type: expression, expr: "{{ picky }}+"}'}
    cfg = write_config(tmp_path / "p", columns=columns)
    r("run", str(cfg), "--run-id", "f", "--quiet")
    r.take()
    s = r.status("f")
    dropped = s["records_dropped"]
    assert dropped > 0 and s["failures"][0]["column"] == "picky"
    fixed = write_config(tmp_path / "p", "fixed.yaml", columns={**columns, "picky": picky.replace("[n, id]",
                                                                                                 "[n, id, word]")})
    plan = r.plan("f", fixed)
    assert plan["picky"] == {"keep": 0, "compute": 100, "reason": "entry changed (requires)"}
    assert plan["label"]["compute"] == 100
    assert plan["up"]["keep"] + plan["up"]["compute"] == 100 and plan["tag"]["compute"] <= dropped
    r("resume", "f", "--config", str(fixed), "--quiet")
    calls = r.take()
    assert_plan_ran(plan, calls)
    assert per_column(calls)["total"] == len({k for c, k in calls if c == "total"})  # each row group once at most
    s = r.status("f")
    assert s["records_dropped"] == 0 and s["failures"] == [] and s["records_done"] == 100
    assert r.export("f") == r.fresh(fixed, "fresh")


def test_growing_100_to_150_records_computes_only_the_new_records(tmp_path):
    r = Runner(tmp_path)
    cfg = write_config(tmp_path / "p", records=100, rg=25)
    r("run", str(cfg), "--run-id", "g", "--quiet")
    old_ids = {k for c, k in r.take() if c == "up"}
    old_rows = r.export("g")
    grown = write_config(tmp_path / "p", "grown.yaml", records=150, rg=25)
    plan = r.plan("g", grown)
    assert all(c == {"keep": 100, "compute": 50, "reason": "unchanged; 50 new records"} for c in plan.values()), plan
    r("resume", "g", "--config", str(grown), "--quiet")
    calls = r.take()
    assert_plan_ran(plan, calls, {"total": 2})
    assert not old_ids & {k for c, k in calls if c != "total"}  # no old record computed again
    rows = r.export("g")
    assert rows[:100] == old_rows  # samplers and every cell of the old records kept
    assert rows == r.fresh(grown, "fresh")
    assert r.status("g")["num_records"] == 150


def test_growing_into_a_partial_row_group_recomputes_only_its_batch_column(tmp_path):
    r = Runner(tmp_path)
    cfg = write_config(tmp_path / "p", records=100, rg=30)  # the last row group holds 10 records
    r("run", str(cfg), "--run-id", "g", "--quiet")
    r.take()
    grown = write_config(tmp_path / "p", "grown.yaml", records=150, rg=30)
    plan = r.plan("g", grown)
    assert plan["up"] == {"keep": 100, "compute": 50, "reason": "unchanged; 50 new records"}
    assert plan["id"]["keep"] == 100  # drawn again in the row group that grew: the same values
    assert plan["total"] == {"keep": 90, "compute": 60, "reason": "unchanged; 50 new records"}
    r("resume", "g", "--config", str(grown), "--quiet")
    assert_plan_ran(plan, r.take(), {"total": 2})  # row group 3 (grown) and 4 (new)
    assert r.export("g") == r.fresh(grown, "fresh")


def test_shrinking_drops_the_records_past_the_end_and_computes_only_a_cut_batch(tmp_path):
    r = Runner(tmp_path)
    cfg = write_config(tmp_path / "p", records=100, rg=25)
    r("run", str(cfg), "--run-id", "s", "--quiet")
    r.take()
    small = write_config(tmp_path / "p", "small.yaml", records=60, rg=25)
    plan = r.plan("s", small)
    assert plan["up"] == {"keep": 60, "compute": 0, "reason": "unchanged"}
    assert plan["total"] == {"keep": 50, "compute": 10, "reason": "unchanged"}  # row group 2 was cut
    r("resume", "s", "--config", str(small), "--quiet")
    assert per_column(r.take()) == {"total": 1}
    rows = r.export("s")
    assert len(rows) == 60 and rows == r.fresh(small, "fresh")
    s = r.status("s")
    assert s["num_records"] == 60 and s["row_groups"]["total"] == 3 and s["status"] == "complete"
    files = sorted(p.name for p in (r.home / "runs" / "s" / "row_groups").iterdir())
    assert [f[:9] for f in files] == ["rg-000000", "rg-000001", "rg-000002"], files  # row group 3's went


def test_a_change_is_refused_while_a_worker_holds_the_run(tmp_path):
    r = Runner(tmp_path)
    cfg = write_config(tmp_path / "p", in_flight=2)
    new = write_config(tmp_path / "p", "new.yaml", columns={**COLUMNS, "tag": COLUMNS["tag"].replace("#", "@")})
    slow = {**r.env, "PIPELINE_TEST_SLEEP": "1.0"}  # it runs for minutes: still running when refused
    proc = cli_popen("run", str(cfg), "--run-id", "busy", "--quiet", home=r.home, env=slow)
    try:
        deadline = time.monotonic() + 60
        while not any(c == "up" for c, _ in read_calls(r.calls)):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.01)
        config = r.sql("select config from runs where run_id = 'busy'")[0]["config"]
        refused = r("resume", "busy", "--config", str(new), code=2)
        assert "live worker" in refused.stderr and "Stop them first" in refused.stderr
        assert r.sql("select config from runs where run_id = 'busy'")[0]["config"] == config
        assert r.sql("select count(*) as n from run_changes")[0]["n"] == 0
        # --plan only reads: it answers while the worker runs
        assert r.plan("busy", new)["tag"]["reason"] == "entry changed (expr)"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    r("resume", "busy", "--config", str(new), "--quiet")
    assert r.export("busy") == r.fresh(new, "fresh")


def test_plan_and_json_need_config_and_a_row_group_size_change_is_refused(tmp_path):
    r = Runner(tmp_path)
    cfg = write_config(tmp_path / "p")
    r("run", str(cfg), "--run-id", "u", "--quiet")
    assert "--config" in r("resume", "u", "--plan", code=2).stderr
    other = write_config(tmp_path / "p", "rg.yaml", rg=20)
    proc = r("resume", "u", "--config", str(other), code=2)
    assert "row_group_size cannot change" in proc.stderr and "--reuse u" in proc.stderr


# -- a kill while a change is applied ----------------------------------------------------------
def test_a_kill_inside_the_change_transaction_leaves_the_old_run_and_resume_applies_it(tmp_path, postgres_url):
    """PostgreSQL, where the test can hold the change inside its transaction: a row lock on the
    last row group stops it there, after every other row group was rewritten in the same
    transaction; then the process is SIGKILLed."""
    import sqlalchemy as sa

    r = Runner(tmp_path, db=postgres_url)
    cfg = write_config(tmp_path / "p")
    r("run", str(cfg), "--run-id", "k", "--quiet")
    r.take()
    new = write_config(tmp_path / "p", "new.yaml", columns={**COLUMNS, "tag": COLUMNS["tag"].replace("#", "@")})
    runs = "select config, fingerprint, num_records, status from runs where run_id = 'k'"
    groups = "select row_group, state, path, lease_epoch from row_groups where run_id = 'k' order by row_group"
    before_runs, before_groups = r.sql(runs), r.sql(groups)
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as lock, engine.connect().execution_options(isolation_level="AUTOCOMMIT") as look:
            lock.execute(sa.text("begin"))
            lock.execute(sa.text("select 1 from row_groups where run_id = 'k' and row_group = 3 for update"))
            me = lock.execute(sa.text("select pg_backend_pid()")).scalar()
            proc = cli_popen("resume", "k", "--config", str(new), "--quiet", home=r.home, db=postgres_url, env=r.env)
            try:
                deadline = time.monotonic() + 90
                waits_on_us = sa.text("select query from pg_stat_activity where :me = any(pg_blocking_pids(pid))")
                while not (held := look.execute(waits_on_us, {"me": me}).scalars().all()):
                    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
                    time.sleep(0.05)
                assert held[0].startswith("UPDATE row_groups"), held  # rewriting row group 3, 0-2 done
            finally:
                proc.kill()
                proc.communicate(timeout=60)
            lock.execute(sa.text("rollback"))
    finally:
        engine.dispose()
    assert r.sql(runs) == before_runs and r.sql(groups) == before_groups  # the old run, whole
    assert r.sql("select count(*) as n from tasks where run_id = 'k'")[0]["n"] == 0
    assert r.sql("select count(*) as n from run_changes")[0]["n"] == 0
    assert r.take() == []
    r("resume", "k", "--config", str(new), "--quiet")
    assert per_column(r.take()) == {"after": 100}
    assert r.sql("select count(*) as n from run_changes")[0]["n"] == 3  # config, tag, after: once
    assert r.export("k") == r.fresh(new, "fresh")


# -- PostgreSQL -----------------------------------------------------------------------------------
def test_a_changed_module_then_resume_on_postgres(tmp_path, postgres_url):
    r = Runner(tmp_path, db=postgres_url, sleep_s=0.01)
    cfg = write_config(tmp_path / "p", in_flight=4)
    interrupt(r, ["run", str(cfg), "--run-id", "pg"], ups=40)
    r.take()
    (tmp_path / "p" / "mod_up.py").write_text(MOD_UP.replace(".upper()", ".title()"))
    plan = r.plan("pg", cfg)
    assert plan["up"]["compute"] == 100 and plan["len"]["reason"] == "reads a changed column: up"
    r("resume", "pg", "--config", str(cfg), "--quiet")
    assert_plan_ran(plan, r.take(), {"total": 4})
    rows = r.export("pg")
    assert rows == r.fresh(cfg, "fresh") and rows[0]["up"][1:].islower()
    grown = write_config(tmp_path / "p", "grown.yaml", records=150)
    r("run", str(grown), "--run-id", "pg2", "--reuse", "pg", "--quiet")
    assert per_column(r.take()) == {"up": 50, "len": 50, "after": 50, "total": 2}
    assert r.export("pg2") == r.fresh(grown, "fresh2")
