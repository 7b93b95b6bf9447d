"""A run created and not started yet (`run --create-only`) as `status` and `runs` show it: the
store keeps it `interrupted` (the only status a run nobody works on may have), the JSON says
`started: false`, the text says "created, not started"."""

from __future__ import annotations

import json
import signal
import textwrap
import time

import pytest

from tests.conftest import cli, cli_popen

SLOW_CELLS = "import time\n\ndef slow(row):\n    time.sleep(0.05)\n    return 1\n"


def write(folder, records=10):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cells.py").write_text(SLOW_CELLS)
    path = folder / "cfg.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: later
        num_records: {records}
        row_group_size: 5
        settings: {{max_in_flight_tasks: 1}}
        columns:
          - {{name: id, type: sampler, sampler: uuid}}
          - {{name: slow, type: python, function: "cells:slow", requires: [id]}}
        """))
    return path


def shown(home, run_id):
    status = json.loads(cli("status", run_id, "--json", home=home, check=True).stdout)
    [listed] = [r for r in json.loads(cli("runs", "--json", home=home, check=True).stdout) if r["run_id"] == run_id]
    text = cli("status", run_id, home=home, check=True).stdout
    table = [line for line in cli("runs", home=home, check=True).stdout.splitlines() if line.startswith(run_id)]
    return status, listed, text, table[0]


@pytest.mark.slow
def test_a_run_created_and_not_started_says_so_until_a_worker_runs_it(tmp_path):
    home = tmp_path / "home"
    cli("run", str(write(tmp_path / "p")), "--run-id", "later", "--create-only", home=home, check=True)
    status, listed, text, row = shown(home, "later")
    assert (status["status"], status["started"]) == ("interrupted", False)  # the JSON keeps the stored status
    assert (listed["status"], listed["started"]) == ("interrupted", False)
    assert text.splitlines()[0] == "run later (later): created, not started"
    assert f"`pipeline worker later --home {home}`" in text and "interrupted" not in text
    assert "created, not started" in row and "interrupted" not in row
    cli("worker", "later", "--quiet", home=home, check=True)
    status, listed, text, row = shown(home, "later")
    assert (status["status"], status["started"], listed["started"]) == ("complete", True, True)
    assert "not started" not in text + row


@pytest.mark.slow
def test_a_run_stopped_after_it_started_is_shown_interrupted(tmp_path):
    home = tmp_path / "home"
    proc = cli_popen("run", str(write(tmp_path / "p", records=400)), "--run-id", "stopped", "--quiet", home=home)
    assert proc.stdout.readline().startswith("run_id:")
    deadline = time.monotonic() + 60
    while json.loads(cli("status", "stopped", "--json", home=home, check=True).stdout)["columns"]["slow"]["done"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    status, listed, text, row = shown(home, "stopped")
    assert (status["status"], status["started"], listed["started"]) == ("interrupted", True, True)
    assert text.splitlines()[0] == "run stopped (later): interrupted" and "interrupted" in row
