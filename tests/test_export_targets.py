"""What `pipeline export -o PATH` does to what is at PATH: a regular file is replaced whole, a
symlink's target is what gets replaced (the link stays), a FIFO or device is written into and
never replaced (`/dev/stdout` piped, or `-`, writes into the pipe), a folder is refused."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, cli, cli_env

QUICKSTART = ROOT / "examples" / "quickstart.yaml"


@pytest.fixture(scope="module")
def run_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("exp") / "home"
    cli("run", str(QUICKSTART), "--run-id", "qs", "--num-records", "30", "--quiet", home=home, check=True)
    return home


@pytest.mark.slow
def test_a_symlink_is_followed_and_stays_a_link(run_home, tmp_path):
    target = tmp_path / "real.jsonl"
    target.write_text("old")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    cli("export", "qs", "-o", str(link), home=run_home, check=True)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert len(target.read_text().splitlines()) == 30


def test_a_fifo_is_written_into_not_replaced(run_home, tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    proc = cli("export", "qs", "-o", str(fifo), home=run_home, timeout=120)
    reader.join(60)
    assert proc.returncode == 0, proc.stderr
    assert fifo.is_fifo()
    assert [json.loads(line)["id"] for line in received[0].splitlines()][:1] and len(received[0].splitlines()) == 30


def test_a_folder_is_refused_and_left_alone(run_home, tmp_path):
    folder = tmp_path / "out.jsonl"
    folder.mkdir()
    proc = cli("export", "qs", "-o", str(folder), home=run_home)
    assert proc.returncode == 2 and "folder" in proc.stderr and "Traceback" not in proc.stderr
    assert folder.is_dir() and not any(folder.iterdir())


@pytest.mark.parametrize("args", [
    ["export", "qs", "-o", "{file}/x.jsonl"],
    ["export", "qs", "-o", "{file}/sub", "--card"],
    pytest.param(["export", "qs", "-o", "/proc/pipeline-card", "--card"], marks=pytest.mark.slow),
])
def test_an_output_that_cannot_be_written_exits_2_with_a_message(run_home, tmp_path, args):
    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    proc = cli(*[a.replace("{file}", str(blocker)) for a in args], home=run_home)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "could not" in proc.stderr
    assert blocker.read_text() == "keep"


@pytest.mark.slow
def test_a_report_that_cannot_be_written_exits_2_with_a_message(tmp_path):
    home = tmp_path / "home"
    cli("run", str(QUICKSTART), "--run-id", "tr", "--num-records", "10", "--trace", "--quiet", home=home, check=True)
    blocker = tmp_path / "afile"
    blocker.write_text("keep")
    proc = cli("report", "tr", "-o", str(blocker / "x.png"), home=home)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "could not" in proc.stderr, proc.stderr


def _records_in(data: bytes, fmt: str) -> list[str]:
    """The ids of the records in an export's bytes."""
    if fmt == "parquet":
        return pq.read_table(io.BytesIO(data)).column("id").to_pylist()
    lines = data.decode().splitlines()
    if fmt == "csv":
        assert lines[0].split(",")[0] == "id"
        return [line.split(",")[0] for line in lines[1:]]
    return [json.loads(line)["id"] for line in lines]


@pytest.mark.parametrize("output", ["/dev/stdout", "-"])
@pytest.mark.parametrize("fmt", ["jsonl", pytest.param("csv", marks=pytest.mark.slow), "parquet"])
def test_standard_output_into_a_pipe_gets_the_data_and_nothing_else(run_home, tmp_path, output, fmt):
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", "qs", "-o", output, "--format", fmt,
                           "--home", str(run_home)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=cli_env(), cwd=tmp_path, timeout=120)
    stderr = proc.stderr.decode()
    assert proc.returncode == 0, stderr
    assert len(_records_in(proc.stdout, fmt)) == 30  # only the data: a message there would break the parse
    assert "wrote 30 records to" in stderr
    assert list(tmp_path.iterdir()) == []  # no file named '-', no temporary file left


def test_dev_stdout_redirected_to_a_file_writes_into_that_file(run_home, tmp_path):
    target = tmp_path / "out.jsonl"
    with open(target, "wb") as out:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "export", "qs", "-o", "/dev/stdout",
                               "--format", "jsonl", "--home", str(run_home)], stdout=out, stderr=subprocess.PIPE,
                              env=cli_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode()
    assert len(_records_in(target.read_bytes(), "jsonl")) == 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_a_card_cannot_go_to_standard_output(run_home, tmp_path):
    proc = cli("export", "qs", "-o", "-", "--card", home=run_home, cwd=tmp_path)
    assert proc.returncode == 2 and "standard output" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_a_format_that_differs_from_the_outputs_suffix_is_said(run_home, tmp_path):
    """`--format csv -o x.jsonl` wrote CSV into a .jsonl file without a word."""
    proc = cli("export", "qs", "-o", str(tmp_path / "x.jsonl"), "--format", "csv", home=run_home)
    assert proc.returncode == 0, proc.stderr
    assert "as csv (--format; the name ends in .jsonl)" in proc.stderr
    assert (tmp_path / "x.jsonl").read_text().splitlines()[0].count(",") >= 1  # CSV, as asked
    same = cli("export", "qs", "-o", str(tmp_path / "y.csv"), home=run_home)
    assert same.returncode == 0 and " as " not in same.stderr
