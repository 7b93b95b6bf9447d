"""A stateful generator's state survives a kill (issue 14 item 11): ``state_dict()`` is recorded
with each of its finished tasks and handed to ``load_state_dict()`` on resume; without them,
resume says that the state restarts."""

from __future__ import annotations

import contextlib
import json
import signal
import sqlite3
import time

import pytest

from tests.conftest import cli, cli_popen
from tests.llm_run_helpers import write_config

COUNTERS = '''
import time
import pipeline


class Counter(pipeline.Generator):
    """Numbers the records 1, 2, 3, ... in order: each value depends on every earlier one."""

    strategy = "cell"
    is_stateful = True

    def __init__(self, *args, **kwargs):
        self.n = 0

    def generate(self, row):
        time.sleep(0.01)
        self.n += 1
        return self.n

    def state_dict(self):
        return {"n": self.n}

    def load_state_dict(self, state):
        self.n = state["n"]


class Forgetful(Counter):
    state_dict = pipeline.Generator.state_dict
    load_state_dict = pipeline.Generator.load_state_dict
'''


def counted(db) -> int:
    if not db.exists():
        return 0
    with contextlib.closing(sqlite3.connect(db)) as conn:
        try:
            done = conn.execute("select count(*) from tasks where column_name = 'c' and state = 'done'").fetchone()[0]
            ck = conn.execute("select coalesce(sum(num_rows), 0) from row_groups where state = 'checkpointed'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0
    return done + ck


def killed_and_resumed(tmp_path, cls: str):
    (tmp_path / "counters.py").write_text(COUNTERS)
    cfg = write_config(tmp_path, f"""\
        name: counted
        num_records: 300
        row_group_size: 50
        columns:
          - {{name: id, type: sampler, sampler: uuid}}
          - {{name: c, type: python, function: "counters:{cls}", requires: [id], stateful: true}}
        """)
    home = tmp_path / "home"
    proc = cli_popen("run", str(cfg), "--run-id", "k", "--quiet", home=home)
    try:
        deadline = time.monotonic() + 60
        while counted(home / "state.db") < 120:
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before the kill"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.communicate()
    resumed = cli("resume", "k", home=home)
    assert resumed.returncode == 0, resumed.stderr
    out = tmp_path / "out.jsonl"
    cli("export", "k", "--output", str(out), home=home, check=True)
    return [json.loads(line)["c"] for line in out.read_text().splitlines()], resumed.stderr


@pytest.mark.slow
def test_a_stateful_generator_with_state_dict_goes_on_after_a_kill_as_if_nothing_happened(tmp_path):
    values, _ = killed_and_resumed(tmp_path, "Counter")
    assert values == list(range(1, 301))


@pytest.mark.slow
def test_a_stateful_generator_without_state_dict_is_told_to_restart(tmp_path):
    values, stderr = killed_and_resumed(tmp_path, "Forgetful")
    assert "does not implement state_dict()" in stderr and "restarts" in stderr
    assert len(set(values)) < len(values), "its counter restarted: duplicates, as the warning says"


@pytest.mark.slow
def test_the_state_is_visible_with_sql(tmp_path):
    (tmp_path / "counters.py").write_text(COUNTERS)
    cfg = write_config(tmp_path, """\
        name: counted
        num_records: 20
        row_group_size: 10
        columns:
          - {name: id, type: sampler, sampler: uuid}
          - {name: c, type: python, function: "counters:Counter", requires: [id], stateful: true}
        """)
    home = tmp_path / "home"
    assert cli("run", str(cfg), "--run-id", "s", "--quiet", home=home).returncode == 0
    rows = json.loads(cli("sql", "select generator, row_group, state from generator_states order by row_group",
                          "--json", home=home, check=True).stdout)
    assert rows == [{"generator": "c", "row_group": 0, "state": '{"n":10}'},
                    {"generator": "c", "row_group": 1, "state": '{"n":20}'}]


@pytest.mark.slow
def test_the_state_goes_from_worker_to_worker_with_the_row_groups(tmp_path):
    (tmp_path / "counters.py").write_text(COUNTERS)
    cfg = write_config(tmp_path, """\
        name: counted
        num_records: 200
        row_group_size: 20
        settings: {max_concurrent_row_groups: 2}
        columns:
          - {name: id, type: sampler, sampler: uuid}
          - {name: c, type: python, function: "counters:Counter", requires: [id], stateful: true}
        """)
    home = tmp_path / "home"
    cli("run", str(cfg), "--run-id", "w", "--create-only", home=home, check=True)
    workers = [cli_popen("worker", "w", "--quiet", home=home) for _ in range(2)]
    for w in workers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    out = tmp_path / "out.jsonl"
    cli("export", "w", "--output", str(out), home=home, check=True)
    assert [json.loads(line)["c"] for line in out.read_text().splitlines()] == list(range(1, 201))
