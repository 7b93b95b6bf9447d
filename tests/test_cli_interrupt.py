"""Ctrl-C before a command's run has its own signal handling (loading the config, importing a
user module) exits 130 with one line saying nothing was changed, not click's "Aborted!" / 1."""

from __future__ import annotations

import signal
import textwrap
import time

import pytest

from tests.conftest import cli_popen

SLOW_IMPORT = '''
import os, pathlib, time
pathlib.Path(os.environ["READY_FILE"]).write_text("importing")
while True:  # a module whose import takes as long as the user waits
    time.sleep(0.05)

def f(row):
    return 1
'''


@pytest.mark.parametrize("command", ["validate", "run"])
def test_ctrl_c_while_a_user_module_is_imported_exits_130_and_creates_nothing(tmp_path, command):
    (tmp_path / "slow_fns.py").write_text(SLOW_IMPORT)
    config = tmp_path / "p.yaml"
    config.write_text(textwrap.dedent("""\
        name: slow
        num_records: 10
        columns:
          - {name: x, type: python, function: "slow_fns:f"}
    """))
    ready = tmp_path / "ready"
    home = tmp_path / "home"
    from tests.conftest import cli_env
    proc = cli_popen(command, str(config), home=home, env=cli_env(READY_FILE=str(ready)))
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the user module was never imported"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, (out, err)
    assert "Aborted!" not in err
    assert "interrupted" in err and "Traceback" not in err
    assert "run_id:" not in out
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())
