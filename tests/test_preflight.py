"""The model preflight and `pipeline validate` (CONTRACT sections 5 and 9), through the real
command line against real sockets on 127.0.0.1: an endpoint that cannot be reached, that refuses
the key or the model is refused with exit 2 naming alias and URL, and nothing is created."""

from __future__ import annotations

import json
import socket
import uuid

import pytest

import pipeline
from pipeline.errors import ModelCheckError
from tests.conftest import cli, cli_env
from tests.llm_run_helpers import server_stats, write_config


def dead_url() -> str:
    """A base URL on a port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def two_model_config(folder, writer_url, judge_url, *, writer_model="writer-model", judge_model="judge-model",
                     key_env="", timeout_s=60, records=4):
    key = f", api_key_env: {key_env}" if key_env else ""
    return write_config(folder, f"""\
        name: pre
        num_records: {records}
        row_group_size: 2
        models:
          writer: {{base_url: "{writer_url}", model: {writer_model}, timeout_s: {timeout_s}{key}}}
          judge: {{base_url: "{judge_url}", model: {judge_model}{key}}}
          unused: {{base_url: "http://127.0.0.1:9/v1", model: never-checked}}
        columns:
          - {{name: id, type: sampler, sampler: uuid}}
          - {{name: text, type: llm_text, model: writer, prompt: "Say something about {{{{ id }}}}"}}
          - {{name: grade, type: llm_judge, model: judge, prompt: "Grade {{{{ text }}}}", rubric: {{ok: "Is it ok?"}}}}
        """)


def assert_refused(proc, home, *words):
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stdout == ""  # no run_id line: no run
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert not home.exists(), "nothing is created, not even the state store"
    runs = cli("runs", "--json", home=home, check=True)
    assert json.loads(runs.stdout) == [] and not home.exists()


@pytest.mark.slow
def test_an_endpoint_nothing_listens_on_is_refused_naming_alias_and_url_and_nothing_is_created(tmp_path,
                                                                                                fake_server):
    dead, live = dead_url(), fake_server()
    home = tmp_path / "home"
    proc = cli("run", str(two_model_config(tmp_path / "p", dead, live)), "--run-id", "r", home=home)
    assert_refused(proc, home, "model 'writer'", dead, "cannot be reached", "--no-check-models")
    assert "'judge'" not in proc.stderr and "unused" not in proc.stderr, "only the refused alias is named"


@pytest.mark.slow
def test_every_refused_endpoint_is_named_in_one_message(tmp_path):
    first, second = dead_url(), dead_url().replace("/v1", "/other/v1")
    home = tmp_path / "home"
    proc = cli("run", str(two_model_config(tmp_path / "p", first, second)), home=home)
    assert_refused(proc, home, "2 model endpoints refused", f"model 'writer' at {first}", f"model 'judge' at {second}")


@pytest.mark.slow
def test_a_wrong_key_is_refused_and_no_key_reaches_the_output(tmp_path, fake_server):
    secret, wrong = f"sk-{uuid.uuid4().hex}", f"sk-wrong-{uuid.uuid4().hex}"
    url = fake_server(require_key=secret)
    cfg = two_model_config(tmp_path / "p", url, url, key_env="PIPELINE_TEST_PREFLIGHT_KEY")
    home = tmp_path / "home"
    proc = cli("run", str(cfg), home=home, env=cli_env(PIPELINE_TEST_PREFLIGHT_KEY=wrong))
    assert_refused(proc, home, f"model 'writer' at {url}", "HTTP 401", "$PIPELINE_TEST_PREFLIGHT_KEY")
    for text in (proc.stdout, proc.stderr):
        assert wrong not in text and secret not in text
    # The right key passes the same check.
    ok = cli("validate", str(cfg), "--check-models", home=home, env=cli_env(PIPELINE_TEST_PREFLIGHT_KEY=secret))
    assert ok.returncode == 0, ok.stderr
    assert secret not in ok.stdout + ok.stderr and not home.exists()


@pytest.mark.slow
def test_a_model_the_server_does_not_serve_is_refused(tmp_path, fake_server):
    url = fake_server(models=("writer-model", "judge-model"))
    home = tmp_path / "home"
    proc = cli("run", str(two_model_config(tmp_path / "p", url, url, judge_model="jduge-model")), home=home)
    assert_refused(proc, home, f"model 'judge' at {url}", "no model 'jduge-model'", "HTTP 404",
                   "it lists: writer-model, judge-model")
    assert "'writer'" not in proc.stderr


@pytest.mark.slow
def test_an_endpoint_that_accepts_connections_but_never_answers_is_refused_within_its_timeout(tmp_path, fake_server):
    with socket.socket() as silent:  # the kernel accepts connections; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/v1"
        home = tmp_path / "home"
        proc = cli("run", str(two_model_config(tmp_path / "p", url, fake_server(), timeout_s=1)), home=home)
    assert_refused(proc, home, f"model 'writer' at {url}", "no answer within 1 s")


@pytest.mark.slow
def test_a_listed_model_costs_no_chat_request_and_the_run_counts_only_its_own_calls(tmp_path, fake_server):
    url = fake_server(models=("writer-model", "judge-model"))
    home = tmp_path / "home"
    proc = cli("run", str(two_model_config(tmp_path / "p", url, url)), "--run-id", "ok", "--quiet", home=home)
    assert proc.returncode == 0, proc.stderr
    stats = server_stats(url)
    assert stats["preflight"] == {"list_models": 2, "models": {}}
    assert {m: s["requests"] for m, s in stats["models"].items()} == {"writer-model": 4, "judge-model": 4}


@pytest.mark.slow
def test_a_server_error_at_the_check_warns_and_the_run_goes_on(tmp_path, fake_server):
    # Every first attempt of a prompt gets 503 (the check's too); the engine's retries get through.
    url = fake_server(rate_503=1.0)
    home = tmp_path / "home"
    proc = cli("run", str(two_model_config(tmp_path / "p", url, url)), "--run-id", "warned", "--quiet", home=home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("run_id: warned")
    assert f"model 'writer' at {url}" in proc.stderr and "HTTP 503" in proc.stderr and "going on" in proc.stderr
    stats = server_stats(url)
    assert {m: s["requests"] for m, s in stats["preflight"]["models"].items()} == {"writer-model": 1, "judge-model": 1}
    assert {m: s["requests"] for m, s in stats["models"].items()} == {"writer-model": 8, "judge-model": 8}


@pytest.mark.slow
def test_no_check_models_creates_the_run_against_a_dead_endpoint(tmp_path):
    home = tmp_path / "home"
    cfg = two_model_config(tmp_path / "p", dead_url(), dead_url())
    proc = cli("run", str(cfg), "--run-id", "unchecked", "--no-check-models", "--create-only", home=home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("run_id: unchecked")
    assert [r["run_id"] for r in json.loads(cli("runs", "--json", home=home, check=True).stdout)] == ["unchecked"]
    assert (home / "runs" / "unchecked").is_dir()


@pytest.mark.slow
def test_validate_checks_the_config_and_with_the_flag_its_endpoints_and_creates_nothing(tmp_path, fake_server):
    home = tmp_path / "home"
    dead = dead_url()
    cfg = two_model_config(tmp_path / "p", dead, fake_server())
    proc = cli("validate", str(cfg), home=home)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"OK: {cfg}") and "3 columns: id, text, grade" in proc.stdout
    assert f"model 'writer' at {dead}: not checked" in proc.stdout and "unused" not in proc.stdout

    proc = cli("validate", str(cfg), "--check-models", home=home)
    assert proc.returncode == 2 and f"model 'writer' at {dead}" in proc.stderr and "cannot be reached" in proc.stderr
    assert proc.stdout == ""
    # validate's own advice, not run's: it creates no run and checks models only when asked
    assert "No run was created" not in proc.stderr and "--no-check-models" not in proc.stderr
    proc = cli("preview", str(cfg), home=home)
    assert proc.returncode == 2 and "`pipeline preview --no-check-models" in proc.stderr, proc.stderr

    broken = tmp_path / "broken.yaml"
    broken.write_text(cfg.read_text().replace("model: writer,", "model: nobody,"))
    proc = cli("validate", str(broken), home=home)
    assert proc.returncode == 2 and str(broken) in proc.stderr and "nobody" in proc.stderr
    assert not home.exists()


def test_the_api_checks_models_unless_asked_not_to(tmp_path):
    home = tmp_path / "home"
    cfg = two_model_config(tmp_path / "p", dead_url(), dead_url())
    with pytest.raises(ModelCheckError, match="model 'writer' at http://127.0.0.1:"):
        pipeline.run(cfg, home=home, run_id="api")
    assert not home.exists()
    result = pipeline.run(cfg, home=home, run_id="api", start=False, check_models=False)
    assert result.status == "created" and pipeline.list_runs(home=home)[0]["run_id"] == "api"
    with pytest.raises(ModelCheckError):
        pipeline.validate(cfg, check_models=True)
    assert pipeline.validate(cfg)["columns"] == ["id", "text", "grade"]
