"""`pipeline preview`: the first N records in memory, equal to a full run's, nothing created."""

from __future__ import annotations

import asyncio
import hashlib
import json
import textwrap
from pathlib import Path

import pytest

from tests.conftest import cli, cli_env

FNS = '''
def shout(row):
    return f"{row['title']}!" * (row["stars"] % 3 + 1)
'''

CONFIG = """\
name: preview-test
num_records: 23
row_group_size: 7
seed: 5
columns:
  - {name: id, type: sampler, sampler: uuid}
  - {name: category, type: sampler, sampler: category, params: {values: [books, games, tools], weights: [1, 2, 3]}}
  - {name: stars, type: sampler, sampler: integer, params: {low: 1, high: 5}}
  - {name: price, type: sampler, sampler: uniform, params: {low: 1.0, high: 99.0}}
  - name: seed
    type: seed_dataset
    path: seed.csv
    columns: [city, pop]
    order: shuffle
  - {name: title, type: expression, expr: "{{ category | upper }} in {{ city }} ({{ stars }}*)"}
  - {name: loud, type: python, function: "fns:shout", requires: [title, stars]}
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "fns.py").write_text(FNS)
    rows = "\n".join(f"city{i},{i * 1000}" for i in range(11))
    (folder / "seed.csv").write_text("city,pop\n" + rows + "\n")
    (folder / "cfg.yaml").write_text(CONFIG)
    return folder


def full_run_records(cfg: Path, home: Path) -> list[dict]:
    run = cli("run", str(cfg), "--quiet", home=home, check=True)
    run_id = run.stdout.splitlines()[0].removeprefix("run_id: ")
    out = home.parent / "full.jsonl"
    cli("export", run_id, "--output", str(out), home=home, check=True)
    return [json.loads(line) for line in out.read_text().splitlines()]


def preview_json(cfg: Path, *args: str, home: Path | None = None, **kw) -> list[dict]:
    proc = cli("preview", str(cfg), "--json", *args, home=home, check=True, **kw)
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_preview_equals_the_first_records_of_a_full_run(project, tmp_path):
    full = full_run_records(project / "cfg.yaml", tmp_path / "full-home")
    # 10 records cross the full run's row-group boundary (row_group_size 7): the preview's one
    # row group of 10 must give the same samplers, seed rows (shuffled), expressions, python cells.
    assert preview_json(project / "cfg.yaml", "-n", "10", home=tmp_path / "preview-home") == full[:10]
    assert preview_json(project / "cfg.yaml", "-n", "1") == full[:1]
    assert preview_json(project / "cfg.yaml") == full[:5]  # default N = 5


def test_the_python_api_preview_gives_the_same_records_as_the_command(project, tmp_path, monkeypatch):
    import pipeline

    monkeypatch.chdir(tmp_path)
    records = pipeline.preview(project / "cfg.yaml", n=4)
    assert [list(r) for r in records] == [["id", "category", "stars", "price", "city", "pop", "title", "loud"]] * 4
    assert json.loads(json.dumps(records)) == preview_json(project / "cfg.yaml", "-n", "4")
    assert not (tmp_path / ".pipeline").exists()


async def test_the_python_api_preview_works_inside_a_running_event_loop(project, tmp_path, monkeypatch):
    import pipeline

    monkeypatch.chdir(tmp_path)
    asyncio.get_running_loop()  # a notebook's situation
    assert len(pipeline.preview(project / "cfg.yaml", n=3)) == 3
    assert not (tmp_path / ".pipeline").exists()


@pytest.mark.slow
def test_preview_creates_nothing_under_home(project, tmp_path):
    home = tmp_path / "home"
    cli("preview", str(project / "cfg.yaml"), home=home, check=True)
    assert not home.exists()
    home.mkdir()
    cli("preview", str(project / "cfg.yaml"), "--json", "--show-prompts", home=home, check=True)
    assert list(home.iterdir()) == []
    # The default home (./.pipeline) and $PIPELINE_HOME are not created either.
    work = tmp_path / "cwd"
    work.mkdir()
    cli("preview", str(project / "cfg.yaml"), cwd=work, check=True)
    cli("preview", str(project / "cfg.yaml"), cwd=work, env=cli_env(PIPELINE_HOME=str(tmp_path / "env-home")),
        check=True)
    assert list(work.iterdir()) == [] and not (tmp_path / "env-home").exists()


def test_preview_json_is_a_list_of_objects_with_the_columns_in_config_order(project):
    records = preview_json(project / "cfg.yaml", "-n", "3")
    assert isinstance(records, list) and len(records) == 3
    for record in records:
        assert list(record) == ["id", "category", "stars", "price", "city", "pop", "title", "loud"]
        assert isinstance(record["stars"], int) and isinstance(record["price"], float)


@pytest.mark.slow
def test_preview_of_more_records_than_the_config_has_gives_all_of_them(project, tmp_path):
    full = full_run_records(project / "cfg.yaml", tmp_path / "home")
    proc = cli("preview", str(project / "cfg.yaml"), "-n", "100", "--json", check=True)
    assert json.loads(proc.stdout) == full
    assert "only 23 records" in proc.stderr


@pytest.mark.parametrize("width", [pytest.param(200, marks=pytest.mark.slow), 80,
                                   pytest.param(40, marks=pytest.mark.slow)])
def test_preview_prints_a_table_that_fits_the_terminal(project, width):
    proc = cli("preview", str(project / "cfg.yaml"), env=cli_env(COLUMNS=str(width)), check=True)
    lines = proc.stdout.splitlines()
    assert lines and max(len(line) for line in lines) <= width
    for column in ("category", "stars", "title", "loud"):
        assert column in proc.stdout
    assert "run_id" not in proc.stdout + proc.stderr
    # Side by side when the columns fit, else one small table per record: every value readable.
    assert ("record 5" in proc.stdout) == (width < 200)


def test_preview_refuses_a_bad_config_with_exit_2_and_creates_nothing(project, tmp_path):
    bad = project / "bad.yaml"
    bad.write_text(CONFIG.replace("type: expression", "type: expresion"))
    home = tmp_path / "home"
    proc = cli("preview", str(bad), home=home)
    assert proc.returncode == 2
    assert "unknown column type 'expresion'" in proc.stderr and "bad.yaml" in proc.stderr
    assert not home.exists()
    assert cli("preview", str(project / "cfg.yaml"), "-n", "0").returncode == 2


def llm_config(folder: Path, url: str, system: str = "") -> Path:
    cfg = folder / "llm.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: preview-llm
        num_records: 50
        row_group_size: 10
        models:
          writer: {{base_url: "{url}", model: writer-model}}
        columns:
          - {{name: category, type: sampler, sampler: category, params: {{values: [books, games]}}}}
          - name: review
            type: llm_text
            model: writer
            prompt: "Write a short review of a {{{{ category }}}} product."
        {system}"""))
    return cfg


@pytest.mark.slow
def test_preview_with_an_llm_column_shows_the_prompts_it_sent(fake_server, tmp_path):
    url = fake_server()
    cfg = llm_config(tmp_path, url)
    records = preview_json(cfg, "-n", "3", "--show-prompts", home=tmp_path / "home")
    assert len(records) == 3
    for record in records:
        prompt = record["_prompts"]["review"]
        assert prompt == f"Write a short review of a {record['category']} product."
        # The fake server answers with a digest of the user message it got: the shown prompt
        # is the very text that was sent.
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:12]
        assert record["review"] == f"echo: {digest} {prompt}"
        assert list(record) == ["category", "review", "_prompts"]
    assert "_prompts" not in preview_json(cfg, "-n", "2")[0]
    table = cli("preview", str(cfg), "-n", "2", "--show-prompts", env=cli_env(COLUMNS="100"), check=True)
    assert "prompt of review" in table.stdout and "Write a short review of a" in table.stdout
    assert "no prompt to show" not in table.stderr
    assert not (tmp_path / "home").exists()


def test_show_prompts_without_an_llm_column_says_there_is_none(project):
    proc = cli("preview", str(project / "cfg.yaml"), "-n", "2", "--show-prompts", check=True)
    assert "no llm_* column, so no prompt to show" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_preview_checks_the_models_as_run_does(fake_server, tmp_path):
    cfg = llm_config(tmp_path, fake_server(models="other-model"))  # it does not serve writer-model
    proc = cli("preview", str(cfg), home=tmp_path / "home")
    assert proc.returncode == 2, proc.stderr
    assert "model 'writer'" in proc.stderr and "has no model 'writer-model'" in proc.stderr
    assert "Nothing was computed" in proc.stderr  # the preflight's refusal, in preview's words
    assert "`pipeline preview --no-check-models` skips this check" in proc.stderr  # no --home: preview has none
    skipped = cli("preview", str(cfg), "--no-check-models", "-n", "2", home=tmp_path / "home")
    # Unchecked, the cells ask the model (HTTP 404 each) and fail: no record comes out.
    assert skipped.returncode == 1, skipped.stderr
    assert "Nothing was computed" not in skipped.stderr and "shutdown_error_rate" in skipped.stderr
    assert "2 of 2 records dropped" in skipped.stderr
    assert not (tmp_path / "home").exists()


@pytest.mark.slow
def test_a_preview_whose_model_stays_down_ends_without_advice_to_resume_it(tmp_path):
    """A preview cannot be resumed: neither its reason nor the engine's log names
    `pipeline resume` (the run id 'preview' is no run of the user's)."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = llm_config(tmp_path, f"http://127.0.0.1:{port}/v1", system="settings: {model_down_s: 1}")
    proc = cli("preview", str(cfg), "-n", "2", "--no-check-models", home=tmp_path / "home")
    assert proc.returncode == 1, proc.stderr
    assert "model_down_s 1" in proc.stderr and "unreachable" in proc.stderr, proc.stderr
    assert "pipeline resume" not in proc.stderr, proc.stderr
