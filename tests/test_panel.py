"""The live panel (pipeline/panel.py) as users meet it: on a terminal of 80x24 under a
pseudo-terminal, as plain lines on piped stderr, the whole run's figures in every worker, and
`status --watch` on a terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pyte
import pytest

from tests.conftest import ROOT, cli, cli_env, cli_popen, logged_pipeline

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Z0-9]|\x1b[=>]")
COLUMNS = ["id", "n", "word", "up", "len", "left", "right", "total", "label"]


def run_in_terminal(args: list[str], env: dict, *, cols: int = 80, rows: int = 24, timeout: float = 240,
                    cwd=ROOT) -> tuple[int, bytes]:
    """`pipeline ARGS` with stdout and stderr on a pseudo-terminal of cols x rows; all it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**env, "TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdin=slave, stdout=slave,
                            stderr=slave, env=env, cwd=cwd, close_fds=True)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the other side closed: the process ended
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    return proc.returncode, out


def screens(raw: bytes, cols: int = 80, rows: int = 24) -> list[list[str]]:
    """The terminal's screen as it was before each redraw (a VT100 emulator, pyte), and at the end."""
    screen = pyte.Screen(cols, rows)
    stream = pyte.ByteStream(screen)
    shots = []
    for chunk in re.split(rb"(?=\r\x1b\[2K)", raw):  # rich's Live starts each redraw by erasing its lines
        stream.feed(chunk)
        shots.append(list(screen.display))
    return shots


@pytest.mark.slow
def test_the_panel_on_an_80x24_terminal_shows_every_column_and_the_eta_on_one_screen_and_never_wraps(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=600, rg=50, in_flight=8)
    env = cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls"), PIPELINE_TEST_SLEEP="0.02")
    code, raw = run_in_terminal(["run", str(cfg), "--home", str(tmp_path / "home"), "--no-check-models"], env)
    text = raw.decode("utf-8", "replace")
    assert code == 0, text[-2000:]
    panel_part = text.split("records written")[0]  # the summary after the panel may be as wide as it needs
    for line in re.split(r"\r\n|\r|\n", ANSI.sub("", panel_part)):
        assert len(line.rstrip()) <= 80, line
    # Some screen during the run held the run's progress and every column at once.
    whole = [shot for shot in screens(panel_part.encode())
             if any("ETA" in row for row in shot) and all(any(re.match(rf"\s*{c}\s", row) for row in shot)
                                                          for c in COLUMNS)]
    assert whole, "no screen showed the ETA and every column"
    assert any("records 600/600" in row for row in screens(raw)[-1]), screens(raw)[-1]


def test_piped_stderr_gets_plain_lines_with_the_whole_run(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=300, rg=50)
    proc = cli("run", str(cfg), "--no-check-models", home=tmp_path / "home",
               env=cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls")))
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[" not in proc.stderr and "\r" not in proc.stderr
    panel_lines = [line for line in proc.stderr.splitlines() if line.startswith("run ") and " | records " in line]
    assert panel_lines, proc.stderr
    assert "records 300/300" in panel_lines[-1] and "label=300" in panel_lines[-1]


def test_a_run_shorter_than_the_first_update_ends_on_its_real_rate(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=20, rg=10)
    proc = cli("run", str(cfg), "--no-check-models", home=tmp_path / "home",
               env=cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls")))
    assert proc.returncode == 0, proc.stderr
    # Its only line, but on a loaded machine the run can outlast the first update: the last one.
    final = [line for line in proc.stderr.splitlines() if line.startswith("run ") and " | records " in line][-1]
    assert "records 20/20" in final and "- records/s" not in final, final
    assert float(re.search(r"\| ([\d,]+\.\d) records/s \|", final).group(1).replace(",", "")) > 0, final


def test_the_final_line_shows_the_runs_rate_when_every_record_was_done_before_the_first_update():
    """Under load a 20-record run outlasted its first update with all 20 done: the window of the
    last samples held no progress and the final line said "complete ... 0.0 records/s"."""
    import io

    from pipeline.panel import LivePanel

    out = io.StringIO()
    panel = LivePanel(stream=out, tty=False, every_s=0.0)
    view = {"run_id": "r", "status": "running", "records_done": 20, "num_records": 20,
            "columns": {"a": {"done": 20}}}
    panel.update(view)
    panel.update(view)
    assert "| 0.0 records/s" in out.getvalue().splitlines()[-1]  # no progress since the last view: true while it runs
    panel.close({**view, "status": "complete"}, rate=12.5)
    assert "complete" in out.getvalue().splitlines()[-1] and "| 12.5 records/s" in out.getvalue().splitlines()[-1]


@pytest.mark.slow
def test_two_workers_each_end_on_the_whole_runs_figures(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=1200, rg=50, in_flight=16)
    home = tmp_path / "home"
    env = cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls"))
    cli("run", str(cfg), "--run-id", "shared", "--create-only", home=home, check=True)
    workers = [cli_popen("worker", "shared", home=home, env=env) for _ in range(2)]
    finals = []
    for worker in workers:
        _out, err = worker.communicate(timeout=240)
        assert worker.returncode == 0, err
        lines = [line for line in err.splitlines() if line.startswith("run shared") and " | records " in line]
        assert lines, err
        finals.append(lines[-1])
    done = [int(re.search(r"records ([\d,]+)/1,200", line).group(1).replace(",", "")) for line in finals]
    # Each worker reports the run's records out of the run's total, not its own share: the one
    # that ended last saw all of them.
    assert max(done) == 1200, finals


@pytest.mark.slow
def test_status_watch_on_a_terminal_draws_the_panel_and_ends_with_the_run(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=300, rg=50)
    home = tmp_path / "home"
    cli("run", str(cfg), "--run-id", "done", "--no-check-models", home=home, check=True,
        env=cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls")))
    code, raw = run_in_terminal(["status", "done", "--watch", "--home", str(home)], cli_env())
    assert code == 0, raw[-2000:]
    last = screens(raw)[-1]
    assert any("run done: complete" in row for row in last), last
    assert any("records 300/300" in row for row in last), last
    assert any(re.match(r"\s*label\s+300\s", row) for row in last), last


FAILING = '''
import asyncio

async def flaky(row):
    await asyncio.sleep(0.01)
    if row["n"] % 7 == 0:
        raise ValueError(f"bad {row['n']}")
    return 1
'''


def test_failures_logged_during_the_run_print_above_the_panel_not_through_it(tmp_path):
    (tmp_path / "fl.py").write_text(FAILING)
    cfg = tmp_path / "f.yaml"
    cfg.write_text("name: pf\nnum_records: 1500\nrow_group_size: 100\nsettings: {shutdown_error_rate: 0.9}\n"
                   "columns:\n  - {name: n, type: sampler, sampler: integer, params: {low: 0, high: 100000}}\n"
                   "  - {name: s, type: python, function: \"fl:flaky\", requires: [n]}\n")
    code, raw = run_in_terminal(["run", str(cfg), "--home", str(tmp_path / "home")], cli_env(), cwd=tmp_path)
    assert code == 0, raw[-2000:]
    last = screens(raw)[-1]
    logged = [row for row in last if "failed for good after 1 attempt" in row]
    assert len(logged) == 3, last  # the first three failures of the kind, each whole on its own lines
    panel = next(i for i, row in enumerate(last) if row.startswith("run pf-") and "| row groups" in row)
    assert all(i < panel for i, row in enumerate(last) if "failed for good after" in row), last
    assert not any("failed for good after" in row and "workers" in row for row in last)
