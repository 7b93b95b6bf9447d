"""The Python API inside a running event loop (a Jupyter notebook): arun/aresume/aretry, and a
sync call that says what to do instead of leaving a broken run behind."""

from __future__ import annotations

import asyncio
import signal
import textwrap
from pathlib import Path

import pytest

import pipeline
from pipeline.errors import ModelCheckError, RunExistsError, RunningLoopError

FNS = '''
import asyncio, os

def double(row):
    if os.path.exists(os.environ.get("PIPELINE_TEST_BREAK", "/nonexistent")):
        raise ValueError("broken on purpose")
    return row["n"] * 2

async def slow(row):
    await asyncio.sleep(0.01)
    return row["n"] + 1
'''


def write_config(folder: Path, num_records: int = 20, function: str = "double") -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "nb_fns.py").write_text(FNS)
    cfg = folder / "cfg.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: nb
        num_records: {num_records}
        row_group_size: 5
        settings: {{shutdown_error_rate: 1.0}}
        columns:
          - {{name: n, type: sampler, sampler: integer, params: {{low: 1, high: 100}}}}
          - {{name: out, type: python, function: "nb_fns:{function}", requires: [n]}}
        """))
    return cfg


async def test_arun_runs_inside_a_running_event_loop(tmp_path):
    cfg = write_config(tmp_path / "p")
    before = signal.getsignal(signal.SIGINT)
    result = await pipeline.arun(cfg, home=tmp_path / "home")
    assert result.status == "complete"
    data = pipeline.load_dataset(result.run_id, home=tmp_path / "home")
    assert list(data["out"]) == [n * 2 for n in data["n"]] and len(data) == 20
    assert signal.getsignal(signal.SIGINT) is before  # the loop's owner keeps its signals


async def test_sync_run_inside_a_running_event_loop_says_to_await_arun_and_creates_nothing(tmp_path):
    cfg = write_config(tmp_path / "p")
    home = tmp_path / "home"
    with pytest.raises(RunningLoopError, match=r"await pipeline\.arun\(") as caught:
        pipeline.run(cfg, home=home, run_id="nb1")
    assert "asyncio.to_thread" in str(caught.value)
    assert not home.exists()  # no store, no run folder, no 'interrupted' run
    for call, name in ((lambda: pipeline.resume("nb1", home=home), "aresume"),
                       (lambda: pipeline.retry("nb1", home=home), "aretry")):
        with pytest.raises(RunningLoopError, match=name):
            call()
    assert not home.exists()
    # The advice works: the sync function from a thread, then the id is free for arun.
    result = await asyncio.to_thread(pipeline.run, cfg, home=home, run_id="nb1")
    assert result.status == "complete"
    assert [r["run_id"] for r in pipeline.list_runs(home=home)] == ["nb1"]


def test_aresume_and_aretry_finish_runs_on_the_callers_loop(tmp_path, monkeypatch):
    cfg = write_config(tmp_path / "p")
    home = tmp_path / "home"
    created = pipeline.run(cfg, home=home, run_id="later", start=False)
    assert created.status == "created"
    marker = tmp_path / "break"
    marker.write_text("x")
    monkeypatch.setenv("PIPELINE_TEST_BREAK", str(marker))

    async def notebook() -> tuple:
        resumed = await pipeline.aresume("later", home=home)
        dropped = pipeline.status("later", home=home)["records_dropped"]
        marker.unlink()  # the cause is fixed
        retried = await pipeline.aretry("later", home=home)
        return resumed, dropped, retried

    resumed, dropped, retried = asyncio.run(notebook())
    assert resumed.status == "complete" and dropped == 20  # every record failed (error rate 1.0 allows it)
    assert resumed.resumed and retried.resumed
    assert sum(retried.extra["reopened"].tasks.values()) == 20
    assert retried.status == "complete"
    data = pipeline.load_dataset("later", home=home)
    assert len(data) == 20 and list(data["out"]) == [n * 2 for n in data["n"]]


async def test_a_cancelled_arun_leaves_an_interrupted_run_that_aresume_finishes(tmp_path):
    cfg = write_config(tmp_path / "p", num_records=400, function="slow")
    home = tmp_path / "home"
    ids: list[str] = []
    task = asyncio.create_task(pipeline.arun(cfg, home=home, on_created=ids.append))
    while not ids or pipeline.status(ids[0], home=home)["columns"]["out"]["done"] == 0:
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    state = pipeline.status(ids[0], home=home)
    assert state["status"] == "interrupted" and state["records_done"] < 400
    result = await pipeline.aresume(ids[0], home=home)
    assert result.status == "complete"
    data = pipeline.load_dataset(ids[0], home=home)
    assert list(data["out"]) == [n + 1 for n in data["n"]] and len(data) == 400


def test_advice_from_the_python_api_names_parameters_not_command_line_flags(tmp_path, fake_server):
    cfg = write_config(tmp_path / "p")
    home = tmp_path / "home"
    pipeline.run(cfg, home=home, run_id="taken")
    with pytest.raises(RunExistsError) as caught:
        pipeline.run(cfg, home=home, run_id="taken")
    assert "run_id=" in str(caught.value) and "--run-id" not in str(caught.value)

    llm = tmp_path / "p" / "llm.yaml"
    llm.write_text(textwrap.dedent(f"""\
        name: nb-llm
        num_records: 2
        models:
          m: {{base_url: "{fake_server(models='other')}", model: absent}}
        columns:
          - {{name: a, type: llm_text, model: m, prompt: "hi"}}
        """))
    with pytest.raises(ModelCheckError) as refused:
        pipeline.run(llm, home=home)
    assert "check_models=False" in str(refused.value) and "--no-check-models" not in str(refused.value)
    with pytest.raises(pipeline.PipelineError) as bad_n:
        pipeline.run(cfg, home=home, num_records=0)
    assert "--num-records" not in str(bad_n.value) and "num_records" in str(bad_n.value)


async def test_validate_with_the_model_check_works_inside_a_running_event_loop(tmp_path, fake_server):
    llm = tmp_path / "llm.yaml"
    llm.write_text(textwrap.dedent(f"""\
        name: nb-check
        num_records: 2
        models:
          m: {{base_url: "{fake_server()}", model: some-model}}
        columns:
          - {{name: a, type: llm_text, model: m, prompt: "hi"}}
        """))
    assert pipeline.validate(llm, check_models=True)["models"]["m"]["checked"] is True
