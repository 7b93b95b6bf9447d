"""Every command a message advises works as printed: a run made with --home and --db prints its
next commands with them (a fresh user's `pipeline resume h1`, printed by `run --home H`, looked in
./.pipeline and found no run), and a wrong home is named as the likely cause of missing files."""

from __future__ import annotations

import re
import shlex
import textwrap
from pathlib import Path

from tests.conftest import cli, cli_env

ALL_FAIL = """\
    name: hints
    num_records: 20
    row_group_size: 10
    columns:
      - {name: word, type: sampler, sampler: category, params: {values: [ant, bee]}}
      - {name: n, type: expression, expr: "{{ word }}", dtype: int}
    """

ALL_GOOD = ALL_FAIL.split("      - {name: n,")[0]  # the sampler alone


def advised(text: str) -> list[list[str]]:
    """The `pipeline ...` commands of ``text`` (backquoted, and the summary's export line), split."""
    found = re.findall(r"`(pipeline [^`]*)`", text) + re.findall(r"^export: (pipeline .*)$", text, re.M)
    return [shlex.split(c) for c in found]


def run_as_printed(words: list[str], cwd: Path):
    assert words[0] == "pipeline"
    return cli(*words[1:], cwd=cwd)


def test_the_commands_a_failed_run_advises_carry_its_home_and_db_and_work_from_elsewhere(tmp_path):
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent(ALL_FAIL))
    home, db = tmp_path / "my home", f"sqlite:///{tmp_path / 'db dir' / 's.db'}"
    (tmp_path / "db dir").mkdir()
    proc = cli("run", str(tmp_path / "cfg.yaml"), "--run-id", "h1", home=home, db=db)
    assert proc.returncode == 1, proc.stderr
    commands = advised(proc.stderr)
    assert {c[1] for c in commands} >= {"retry", "resume"}, proc.stderr
    for words in commands:
        assert words[words.index("--home") + 1] == str(home) and words[words.index("--db") + 1] == db, words
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    resume = next(c for c in commands if c[1] == "resume")
    again = run_as_printed(resume, elsewhere)
    assert again.returncode == 1, again.stderr  # it found the run: failed on its error rate, as before
    assert "pipeline retry h1" in again.stderr and "no run" not in again.stderr
    assert not (elsewhere / ".pipeline").exists()


def test_an_error_advises_its_next_command_with_the_home_it_was_given(tmp_path):
    home = tmp_path / "h"
    proc = cli("status", "nope", home=home)
    assert proc.returncode == 2
    (runs,) = [c for c in advised(proc.stderr) if c[1] == "runs"]
    assert runs[runs.index("--home") + 1] == str(home)


def test_the_export_line_of_a_run_made_with_only_db_works_from_the_folder_it_ran_in(tmp_path):
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent(ALL_GOOD))
    db = f"sqlite:///{tmp_path / 's.db'}"
    work = tmp_path / "work"
    work.mkdir()
    proc = cli("run", str(tmp_path / "cfg.yaml"), "--run-id", "h2", db=db, cwd=work)
    assert proc.returncode == 0, proc.stderr
    (export,) = advised(proc.stderr)
    assert export[export.index("--db") + 1] == db and "--home" not in export
    done = run_as_printed(export, work)
    assert done.returncode == 0, done.stderr
    assert (work / "h2.parquet").exists()
    # From another folder the row-group files (under ./.pipeline of the run's folder) are not found:
    # the error names a wrong home as the likely cause before offering to compute them again.
    other = tmp_path / "other"
    other.mkdir()
    lost = run_as_printed(export, other)
    assert lost.returncode == 2
    assert "another home" in lost.stderr and "--home DIR" in lost.stderr, lost.stderr
    assert not (other / "h2.parquet").exists()


def test_a_password_in_db_is_masked_in_the_advised_command_and_a_home_from_the_environment_is_not_repeated(
        tmp_path, postgres_url):
    with_password = postgres_url.replace("postgres@", "postgres:s3cret-pw@", 1)
    assert with_password != postgres_url
    proc = cli("status", "nope", db=with_password)
    assert proc.returncode == 2 and "no run" in proc.stderr, proc.stderr
    (runs,) = [c for c in advised(proc.stderr) if c[1] == "runs"]
    assert "postgres:***@" in runs[runs.index("--db") + 1]
    assert "s3cret-pw" not in proc.stderr + proc.stdout
    in_query = cli("status", "nope", db=postgres_url + "&password=s3cret-pw")  # libpq's other place for it
    assert in_query.returncode == 2 and "password=***" in in_query.stderr, in_query.stderr
    assert "s3cret-pw" not in in_query.stderr + in_query.stdout
    # $PIPELINE_HOME holds for the next command typed in the same shell: the hint does not repeat it
    proc = cli("status", "nope", env=cli_env(PIPELINE_HOME=str(tmp_path / "h")))
    assert proc.returncode == 2
    (runs,) = [c for c in advised(proc.stderr) if c[1] == "runs"]
    assert runs == ["pipeline", "runs"]


def test_the_flags_repeated_in_hints_never_hold_a_password():
    """The engine's messages carry these flags and reach the live panel and RunResult.reason, which
    are not printed through the CLI's redaction: a password in --db is masked here (CONTRACT 8)."""
    from pipeline.cli_text import place

    flags = place("/tmp/a b", "postgresql+psycopg://bob:pw-s3cret@h/db?password=pw-s3cret&sslmode=require")
    assert "pw-s3cret" not in flags
    assert shlex.split(flags) == ["--home", "/tmp/a b", "--db",
                                  "postgresql+psycopg://bob:***@h/db?password=***&sslmode=require"]
