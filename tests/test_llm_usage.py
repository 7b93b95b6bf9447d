"""Model usage as a user sees it: requests and tokens per task and per model in the store,
the model's concurrency in `pipeline status`, and the finished calls a resume saved."""

from __future__ import annotations

import json
import signal
import time

import pytest

from tests.conftest import cli, cli_popen
from tests.llm_run_helpers import server_stats, write_config


def config(folder, url, records=120):
    return write_config(folder, f"""\
        name: usage
        num_records: {records}
        row_group_size: 20
        settings: {{max_concurrent_row_groups: 2}}
        models:
          w: {{base_url: "{url}", model: writer-model, max_parallel_requests: 6}}
        columns:
          - {{name: id, type: sampler, sampler: uuid}}
          - {{name: text, type: llm_text, model: w, prompt: "Say something about {{{{ id }}}}"}}
        """)


@pytest.mark.slow
def test_usage_is_recorded_per_model_and_equals_what_the_server_saw(tmp_path, fake_server):
    url = fake_server(latency_ms=5)
    home = tmp_path / "home"
    cli("run", str(config(tmp_path / "p", url)), "--run-id", "u", "--quiet", home=home, check=True)
    status = json.loads(cli("status", "u", "--json", home=home, check=True).stdout)
    seen = server_stats(url)["models"]["writer-model"]["requests"]
    model = status["models"]["w"]
    assert model["requests"] == seen == 120
    assert model["prompt_tokens"] > 120 and model["completion_tokens"] > 0
    assert model["concurrency"] == 6 and model["rate_limited"] == 0 and model["calls_saved"] == 0
    text = cli("status", "u", home=home, check=True).stdout
    assert "concurrency" in text and "saved by resume" in text


@pytest.mark.slow
def test_a_resume_reports_the_finished_calls_it_did_not_make_again(tmp_path, fake_server):
    url = fake_server(latency_ms=40)
    home = tmp_path / "home"
    proc = cli_popen("run", str(config(tmp_path / "p", url, records=300)), "--run-id", "r", "--quiet", home=home)
    assert proc.stdout.readline().startswith("run_id:")
    deadline = time.monotonic() + 30
    while server_stats(url)["models"].get("writer-model", {}).get("requests", 0) < 60:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    done = json.loads(cli("status", "r", "--json", home=home, check=True).stdout)["columns"]["text"]["done"]
    assert done >= 60
    cli("resume", "r", "--quiet", home=home, check=True)
    model = json.loads(cli("status", "r", "--json", home=home, check=True).stdout)["models"]["w"]
    assert model["calls_saved"] == done
    assert 300 <= model["requests"] <= server_stats(url)["models"]["writer-model"]["requests"]


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "joiner"), [("sqlite", "worker"), ("sqlite", "resume"), ("postgresql", "worker")])
def test_a_resume_joined_at_once_by_another_process_counts_the_saved_calls_once(tmp_path, fake_server, request,
                                                                                 backend, joiner):
    db = request.getfixturevalue("postgres_url") if backend == "postgresql" else None
    url = fake_server(latency_ms=40)
    home = tmp_path / "home"
    proc = cli_popen("run", str(config(tmp_path / "p", url, records=300)), "--run-id", "sv", "--quiet",
                     home=home, db=db)
    assert proc.stdout.readline().startswith("run_id:")
    deadline = time.monotonic() + 30
    while server_stats(url)["models"].get("writer-model", {}).get("requests", 0) < 60:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.kill()
    proc.communicate(timeout=30)
    done = json.loads(cli("status", "sv", "--json", home=home, db=db, check=True).stdout)["columns"]["text"]["done"]
    assert 0 < done < 300
    both = [cli_popen("resume", "sv", "--quiet", home=home, db=db), cli_popen(joiner, "sv", "--quiet", home=home, db=db)]
    for p in both:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    status = json.loads(cli("status", "sv", "--json", home=home, db=db, check=True).stdout)
    assert status["status"] == "complete"
    assert status["models"]["w"]["calls_saved"] == done
