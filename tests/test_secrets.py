"""No secret reaches the store, the logs or the output (CONTRACT section 8; issue 14 item 3).

The real command line runs against the fake OpenAI-compatible server, which echoes the request's
Authorization header where a careless server would: into answers that should be JSON, into
answers that are text, into 4xx and 5xx error bodies. Afterwards the whole home folder (the
state store dumped as SQL, Parquet files read back, traces, exports) and every command's stdout
and stderr are searched for the key.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import subprocess
import textwrap
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import cli, cli_env, fake_server_module

KEY_ENV = "PIPELINE_TEST_LLM_KEY"
FACTS_SCHEMA = {
    "type": "object",
    "properties": {"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "summary": {"type": "string"}},
    "required": ["stars", "summary"],
    "additionalProperties": False,
}
# What each record asks the server for; the prompts carry the fake server's markers.
MODES = ["plain", "echo_json", "e500", "e400", "echo_text"]


@pytest.fixture
def fake_server():
    stops = []

    def start(**options) -> str:
        url, stop = fake_server_module().start_server(**options)
        stops.append(stop)
        return url

    yield start
    for stop in stops:
        stop()


def write_pipeline(folder: Path, url: str, records: int = 20) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.jsonl", "w") as f:
        for i in range(records):
            f.write(json.dumps({"item": f"item-{i:03d}", "mode": MODES[i % len(MODES)]}) + "\n")
    path = folder / "cfg.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: secrets
        num_records: {records}
        row_group_size: 10
        settings: {{retry_backoff_s: 0.01, salvage_max_rounds: 1, shutdown_error_rate: 1.0}}
        models:
          m: {{base_url: "{url}", model: m-model, api_key_env: {KEY_ENV}, max_parallel_requests: 4}}
        columns:
          - {{name: seed, type: seed_dataset, path: items.jsonl, columns: [item, mode], order: sequential}}
          - name: facts
            type: llm_structured
            model: m
            prompt: "Facts about {{{{ item }}}}{{% if mode == 'echo_json' %}} [[echo-auth]]{{% endif %}}"
            output_schema: {json.dumps(FACTS_SCHEMA)}
          - name: review
            type: llm_text
            model: m
            prompt: >-
              Review {{{{ item }}}}
              {{% if mode == 'e500' %}}[[status:500]] [[echo-auth]]{{% endif %}}
              {{% if mode == 'e400' %}}[[status:400]] [[echo-auth]]{{% endif %}}
              {{% if mode == 'echo_text' %}}[[echo-auth]]{{% endif %}}
        """))
    return path


def home_text(home: Path) -> dict[str, str]:
    """Everything under ``home`` as text: files as they are, the SQLite store also dumped as SQL
    (rows spread over overflow pages), Parquet files also read back (their pages are compressed)."""
    texts = {}
    for path in sorted(home.rglob("*")):
        if not path.is_file():
            continue
        texts[str(path)] = path.read_bytes().decode("latin-1")
        if path.name == "state.db":
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                texts[f"{path} (dump)"] = "\n".join(con.iterdump())
            finally:
                con.close()
        elif path.suffix == ".parquet":
            texts[f"{path} (rows)"] = json.dumps(pq.read_table(path).to_pylist(), default=str)
    return texts


def assert_no_key(key: str, home: Path, outputs: list[subprocess.CompletedProcess]) -> None:
    for where, text in home_text(home).items():
        assert key not in text, f"the key is in {where}"
    for proc in outputs:
        assert key not in proc.stdout, f"the key is in the stdout of {proc.args}"
        assert key not in proc.stderr, f"the key is in the stderr of {proc.args}"


@pytest.mark.slow
def test_a_server_echoing_the_authorization_header_never_puts_the_key_in_store_logs_traces_or_output(
        tmp_path, fake_server):
    key = f"sk-test-{uuid.uuid4().hex}-SECRET"
    url = fake_server(require_key=key)
    cfg = write_pipeline(tmp_path / "p", url)
    home = tmp_path / "home"
    env = cli_env(**{KEY_ENV: key})
    outputs = []

    run = cli("run", str(cfg), "--run-id", "echoed", "--trace", home=home, env=env)
    outputs.append(run)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "out.jsonl"
    outputs.append(cli("export", "echoed", "--output", str(out), "--format", "jsonl", home=home, env=env,
                       check=True))
    outputs.append(cli("status", "echoed", "--json", home=home, env=env, check=True))
    outputs.append(cli("sql", "select * from tasks where state = 'failed'", "--json", home=home, env=env,
                       check=True))

    # Every path was taken: the echoes happened, and were blanked out where they landed.
    failed = json.loads(outputs[-1].stdout)
    by_column = {}
    for task in failed:
        by_column.setdefault(task["column_name"], []).append(task["last_error"])
    assert len(by_column.get("facts", [])) == 4, failed  # the echo_json records
    assert all("Authorization: Bearer ***" in e and "last answer starts" in e for e in by_column["facts"]), failed
    review_errors = by_column.get("review", [])
    assert len(review_errors) == 8, failed  # the e500 and e400 records
    assert sum("HTTP 500" in e for e in review_errors) == 4 and sum("HTTP 400" in e for e in review_errors) == 4
    assert all("Authorization: Bearer ***" in e for e in review_errors), review_errors
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    echoed_text = [r["review"] for r in rows if r["mode"] == "echo_text"]
    assert echoed_text and all(text == "Here is what you sent: Authorization: Bearer ***" for text in echoed_text)
    traces = cli("sql", "select error from task_traces where run_id = 'echoed'", "--json", home=home,
                 check=True).stdout
    assert "Bearer ***" in traces
    assert "Bearer ***" in run.stderr, "the failures were logged, redacted"

    assert_no_key(key, home, outputs)


def test_a_wrong_key_echoed_in_every_error_body_stays_out_of_the_output(tmp_path, fake_server):
    key, wrong = f"sk-right-{uuid.uuid4().hex}", f"sk-wrong-{uuid.uuid4().hex}"
    url = fake_server(require_key=key, echo_auth=True)
    cfg = write_pipeline(tmp_path / "p", url, records=10)
    home = tmp_path / "home"
    env = cli_env(**{KEY_ENV: wrong})

    run = cli("run", str(cfg), "--run-id", "wrong", home=home, env=env)
    # Every cell fails on its 401 (the error rate decides 0 or 1), or a check of the endpoint
    # before the run refuses the key (2): either way the key shows nowhere.
    assert run.returncode in (0, 1, 2) and "401" in run.stderr, run.stderr
    outputs = [run]
    if (home / "state.db").exists():
        outputs.append(cli("sql", "select last_error from tasks", home=home, env=env, check=True))
        outputs.append(cli("status", "wrong", "--json", home=home, env=env))
    assert_no_key(wrong, home, outputs)


def test_a_key_pasted_into_api_key_env_is_refused_without_echoing_it(tmp_path):
    key = "sk-" + uuid.uuid4().hex
    folder = tmp_path / "p"
    folder.mkdir()
    cfg = folder / "cfg.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: pasted
        num_records: 2
        models:
          m: {{base_url: "http://127.0.0.1:9/v1", model: x, api_key_env: "{key}"}}
        columns:
          - {{name: a, type: llm_text, model: m, prompt: "hi"}}
        """))
    home = tmp_path / "home"
    proc = cli("run", str(cfg), home=home)
    assert proc.returncode == 2, proc.stderr
    assert "api_key_env must be the NAME of an environment variable" in proc.stderr
    assert "'sk-'" in proc.stderr and key[:4] not in proc.stderr and key not in proc.stdout
    assert not (home / "runs").exists()


@pytest.mark.parametrize("value", ["hf_" + "a1B2" * 8, "nvapi-" + "x" * 30, "my-secret-value",
                                   "a1b2c3d4e5f60718293a4b5c6d7e8f90", "AbCdEfGhIjKlMnOpQrStUvWx0123"])
def test_values_that_look_like_keys_are_refused_as_api_key_env(value, tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import ConfigError

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"name: t\nnum_records: 1\nmodels: {{m: {{base_url: 'http://x', model: y, "
                   f"api_key_env: '{value}'}}}}\ncolumns:\n  - {{name: a, type: llm_text, model: m, prompt: hi}}\n")
    with pytest.raises(ConfigError, match="must be the NAME") as caught:
        load_config(cfg)
    assert value[3:] not in str(caught.value)


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "PIPELINE_TEST_LLM_KEY", "my_key", "NVIDIA_API_KEY_2024",
                                  "_PRIVATE", "OpenRouterKey"])
def test_names_of_environment_variables_are_accepted_as_api_key_env(name):
    from pipeline.redact import looks_like_secret

    assert not looks_like_secret(name)


def test_redact_blanks_registered_keys_and_credential_shapes():
    from pipeline import redact

    key = "zq-" + uuid.uuid4().hex
    redact.register_secret(key)
    cases = {
        f"echo {key} done": "echo *** done",
        'got {"authorization": "Bearer abcdefgh12345678"}': 'got {"authorization": "Bearer ***"}',
        '{\\"Authorization\\": \\"Basic dXNlcjpwYXNz\\"}': '{\\"Authorization\\": \\"Basic ***\\"}',
        "x-api-key: 1234567890abc": "x-api-key: ***",
        "https://bob:hunter2@host/v1?api_key=abc123&y=1": "https://bob:***@host/v1?api_key=***&y=1",
        "--db 'postgresql://u@h/db?password=hunter2&sslmode=x'": "--db 'postgresql://u@h/db?password=***&sslmode=x'",
        "key sk-proj-ABCDEFGHIJKLMNOPQRST end": "key *** end",
        "Bearer tokentokentoken": "Bearer ***",
        "model 'w' at http://host:8000/v1: HTTP 500": "model 'w' at http://host:8000/v1: HTTP 500",
        "column 'hf_embedding_vector_large' on task-0123456789abcdefghij": (
            "column 'hf_embedding_vector_large' on task-0123456789abcdefghij"),
    }
    for text, expected in cases.items():
        assert redact.redact(text) == expected
    # Answers (data) lose only our own keys, not text that merely looks like a credential.
    assert redact.redact_secrets(f"Bearer abcdefgh12345678 {key}") == "Bearer abcdefgh12345678 ***"


def test_every_log_record_is_redacted_whatever_logger_it_comes_from(caplog):
    from pipeline import redact

    key = "zq-" + uuid.uuid4().hex
    redact.register_secret(key)
    with caplog.at_level(logging.WARNING):
        logging.getLogger("pipeline.scheduler").warning("failed: %s", f"answer with {key}")
        try:
            raise ValueError(f"boom {key}")
        except ValueError:
            logging.getLogger("some.library").exception("oops")
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert key not in text and "answer with ***" in text and "boom ***" in text
