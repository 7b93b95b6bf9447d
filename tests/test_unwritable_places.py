"""Places `pipeline` cannot write: a home that cannot be created (a read-only file system, a file
in the way) is one clean `error:` line naming the folder (exit 2), never a traceback, and
nothing is created.

Tests run as root, for whom permissions do not stop a write: a file where a folder is expected
stands in for "cannot create", and a real read-only file system is a bind mount made read-only
inside a private mount namespace (`unshare -m`) of the command alone (skipped where that is not
permitted)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import cli, cli_env

CONFIG = textwrap.dedent("""\
    name: ro
    num_records: 12
    row_group_size: 5
    columns:
      - {name: id, type: sampler, sampler: uuid}
      - {name: n, type: sampler, sampler: integer, params: {low: 1, high: 9}}
    """)


def _config(folder: Path) -> Path:
    path = folder / "cfg.yaml"
    path.write_text(CONFIG)
    return path


def _can_mount_read_only() -> bool:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$1" "$1"', "sh", "/tmp"],
                           capture_output=True, timeout=30)
    return probe.returncode == 0


READ_ONLY_MOUNTS = pytest.mark.skipif(not _can_mount_read_only(),
                                      reason="needs `unshare -m` and `mount --bind -o ro` (root in a mount namespace)")


def in_read_only(folder: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`pipeline ARGS` in ``cwd`` with ``folder`` mounted read-only for that command alone (its own
    mount namespace: the mount ends with it, the rest of the machine never sees it)."""
    script = 'mount --bind -o ro "$1" "$1" && shift && exec "$@"'
    return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", str(folder),
                           sys.executable, "-m", "pipeline.cli", *args],
                          capture_output=True, text=True, timeout=120, env=cli_env(), cwd=cwd)


def clean_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: "), proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)


@pytest.mark.parametrize("args", [
    ["run", "{cfg}", "--quiet"],
    ["run", "{cfg}", "--quiet", "--create-only"],
    ["db", "upgrade"],
])
def test_a_home_behind_a_file_is_a_clean_error_naming_it(tmp_path, args):
    cfg = _config(tmp_path)
    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    home = blocker / "sub"
    proc = cli(*[a.replace("{cfg}", str(cfg)) for a in args], home=home, cwd=tmp_path)
    clean_error(proc, f"cannot create the home folder ({home})", "--home")
    assert blocker.read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "cfg.yaml"]


def test_a_state_store_file_behind_a_file_is_a_clean_error_naming_its_folder(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    proc = cli("run", str(_config(tmp_path)), "--quiet", db=f"sqlite:///{blocker}/state.db", home=tmp_path / "home",
               cwd=tmp_path)
    clean_error(proc, f"cannot create the folder {blocker} of the state store")


def test_a_home_that_cannot_be_made_creates_no_run_in_postgres(tmp_path, postgres_url):
    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    proc = cli("run", str(_config(tmp_path)), "--run-id", "nohome", "--quiet", home=blocker / "sub",
               db=postgres_url, cwd=tmp_path)
    clean_error(proc, "cannot create the home folder")
    runs = cli("runs", "--json", db=postgres_url, home=tmp_path / "other", check=True)
    assert runs.stdout.strip() == "[]"


@READ_ONLY_MOUNTS
def test_run_in_a_read_only_folder_says_so_and_where_to_point_the_home(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    _config(folder)
    proc = in_read_only(folder, "run", "cfg.yaml", "--quiet", cwd=folder)
    clean_error(proc, f"cannot create the home folder ({folder / '.pipeline'})", "Read-only file system", "--home")
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.yaml"]
