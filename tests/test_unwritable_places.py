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


@pytest.mark.parametrize("args", [["runs"], ["runs", "--json"], ["status", "r1"], ["sql", "select 1"],
                                  ["export", "r1", "-o", "x.jsonl"]])
def test_a_command_that_reads_names_a_home_that_is_a_file_instead_of_finding_no_runs(tmp_path, args):
    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    proc = cli(*args, home=blocker, cwd=tmp_path)
    clean_error(proc, f"{blocker} is a file, not a folder", "--home")
    assert proc.stdout == "" and blocker.read_text() == "keep"


def test_a_state_store_file_behind_a_file_is_a_clean_error_naming_its_folder(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    proc = cli("run", str(_config(tmp_path)), "--quiet", db=f"sqlite:///{blocker}/state.db", home=tmp_path / "home",
               cwd=tmp_path)
    clean_error(proc, f"cannot create the folder {blocker} of the state store")


@pytest.mark.slow
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


# -- a state store in a folder that cannot be written ------------------------------------------

@pytest.fixture(scope="module")
def ro_home(tmp_path_factory):
    """A home with one complete run ("r"), its WAL folded into state.db (a command that reads
    closes the store last, as any process does after `pipeline run`, which leaves it open)."""
    folder = tmp_path_factory.mktemp("rohome")
    home = folder / "home"
    cli("run", str(_config(folder)), "--run-id", "r", "--quiet", home=home, check=True)
    cli("runs", home=home, check=True)
    assert sorted(p.name for p in home.iterdir()) == ["runs", "state.db"]
    return home


@READ_ONLY_MOUNTS
@pytest.mark.parametrize("args, expected", [
    (["runs", "--json"], '"run_id": "r"'),
    (["status", "r", "--json"], '"records_done": 12'),
    (["sql", "select count(*) as n from row_groups", "--json"], '[{"n": 3}]'),
    (["db", "current"], "current: 0"),
    (["export", "r", "-o", "-", "--format", "jsonl"], '"id": '),
])
def test_commands_that_read_work_on_a_store_in_a_read_only_folder(ro_home, tmp_path, args, expected):
    proc = in_read_only(ro_home, *args, "--home", str(ro_home), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout
    if args[0] == "export":
        assert len(proc.stdout.splitlines()) == 12
    assert sorted(p.name for p in ro_home.iterdir()) == ["runs", "state.db"]


@READ_ONLY_MOUNTS
def test_a_command_that_writes_says_the_folder_of_the_store_cannot_be_written(ro_home, tmp_path):
    proc = in_read_only(ro_home, "resume", "r", "--quiet", "--home", str(ro_home), cwd=tmp_path)
    clean_error(proc, f"its folder {ro_home} cannot be written", "state.db-shm", "copy the folder")


@READ_ONLY_MOUNTS
@pytest.mark.slow
def test_a_read_only_store_with_transactions_still_in_its_wal_is_read_or_refused_with_the_reason(tmp_path):
    home = tmp_path / "home"
    cli("run", str(_config(tmp_path)), "--run-id", "w", "--quiet", home=home, check=True)
    # `pipeline run` leaves the store open at exit: state.db-wal holds the run, -shm beside it.
    assert (home / "state.db-wal").stat().st_size > 0 and (home / "state.db-shm").exists()
    proc = in_read_only(home, "runs", "--json", "--home", str(home), cwd=tmp_path)
    assert proc.returncode == 0 and '"run_id": "w"' in proc.stdout, proc.stderr  # SQLite reads -wal through -shm
    (home / "state.db-shm").unlink()
    proc = in_read_only(home, "runs", "--json", "--home", str(home), cwd=tmp_path)
    # state.db alone would be a store without the run: refused, saying why, rather than read stale.
    clean_error(proc, "SQLite must create state.db-shm", "state.db-wal", "copy the folder")
    assert proc.stdout == ""


def test_the_read_only_fallback_reads_state_db_alone_only_when_no_wal_holds_transactions(ro_home, tmp_path, monkeypatch):
    """The decision itself, where no read-only mount can be made: os.access says "not writable"."""
    import sqlite3

    from sqlalchemy.engine import URL

    from pipeline.errors import StoreError
    from pipeline.store import sqlite as store_sqlite

    url = URL.create("sqlite", database=str(ro_home / "state.db"))
    cannot_open = StoreError("cannot use the state store: unable to open database file")
    assert store_sqlite.read_only_fallback(url, cannot_open) is None  # the folder can be written
    monkeypatch.setattr(store_sqlite.os, "access", lambda path, mode: False)
    assert store_sqlite.read_only_fallback(url, StoreError("database is locked")) is None
    fallback = store_sqlite.read_only_fallback(url, cannot_open)
    assert fallback.query == {"uri": "true", "mode": "ro", "immutable": "1"}
    connection = sqlite3.connect(fallback.database + "?mode=ro&immutable=1", uri=True)
    try:
        assert connection.execute("select run_id from runs").fetchall() == [("r",)]
    finally:
        connection.close()
    copy = tmp_path / "state.db"
    copy.write_bytes((ro_home / "state.db").read_bytes())
    (tmp_path / "state.db-wal").write_bytes(b"x" * 100)
    with pytest.raises(StoreError, match="transactions still in state.db-wal"):
        store_sqlite.read_only_fallback(URL.create("sqlite", database=str(copy)), cannot_open)
