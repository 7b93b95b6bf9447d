"""Acceptance tests of the LLM columns, end to end: real HTTP on 127.0.0.1 against the fake
OpenAI-compatible server (scripts/fake_llm_server.py), and the real command line wherever a
user would use it.

- every LLM column type, on two models, through 429s and 503s: every record, the expected values;
- answers that never parse drop exactly their records, and `status` says so;
- the API key never reaches the state store, the home folder or any command's output;
- a burst of 429s on one model throttles that model only, and its limit recovers;
- a run interrupted by SIGINT mid-flight resumes to the uninterrupted dataset, without
  repeating the calls that had finished.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import pytest

from tests.conftest import FAKE_SERVER_SCRIPT as SERVER_SCRIPT
from tests.conftest import ROOT, ServerProcess, cli, cli_env, cli_popen, fake_server_module


# -- the fake server ------------------------------------------------------------------------
def server_stats(url: str) -> dict:
    """GET /stats: {model: {requests, rate_limited, server_errors, in_flight, max_in_flight}} and uptime_s."""
    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as response:
        return json.loads(response.read())


# -- helpers --------------------------------------------------------------------------------
def write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def echo_answer(prompt: str) -> str:
    """The fake server's deterministic answer to a text prompt (see its docstring)."""
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:12]
    return " ".join(f"echo: {digest} {' '.join(prompt.split()[:12])}".split())


def export_jsonl(run_id: str, home: Path, out: Path, env: dict | None = None,
                 outputs: list | None = None) -> list[dict]:
    proc = cli("export", run_id, "--output", str(out), "--format", "jsonl", home=home, env=env, check=True)
    if outputs is not None:
        outputs.append(proc)
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def status_json(run_id: str, home: Path, env: dict | None = None, outputs: list | None = None) -> dict:
    proc = cli("status", run_id, "--json", home=home, env=env, check=True)
    if outputs is not None:
        outputs.append(proc)
    return json.loads(proc.stdout)


def sql_json(query: str, home: Path, env: dict | None = None, outputs: list | None = None) -> list[dict]:
    proc = cli("sql", query, "--json", home=home, env=env, check=True)
    if outputs is not None:
        outputs.append(proc)
    return json.loads(proc.stdout)


def assert_ran(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


FACTS_SCHEMA = {
    "type": "object",
    "properties": {  # not in alphabetical order: the order is the user's
        "verdict": {"enum": ["buy", "skip"]},
        "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "summary": {"type": "string", "minLength": 3, "maxLength": 40},
    },
    "required": ["verdict", "stars", "tags", "summary"],
    "additionalProperties": False,
}
RUBRIC = {"clarity": "Is the review clear?", "accuracy": "Does it match the product?"}  # not sorted either


def three_columns_config(folder: Path, url: str, *, records: int, writer_parallel: int = 8,
                         judge_parallel: int = 8, settings: str = "", extra_models: str = "") -> Path:
    """llm_text and llm_structured on alias `writer`, llm_judge (reading the text) on `judge`;
    every prompt holds the record's uuid, so every prompt is distinct."""
    return write_config(folder, f"""\
        name: llm-three
        num_records: {records}
        row_group_size: 50
        seed: 3
        settings: {{retry_backoff_s: 0.02, max_concurrent_row_groups: 4{settings}}}
        models:
          writer: {{base_url: "{url}", model: writer-model, max_parallel_requests: {writer_parallel}{extra_models}}}
          judge: {{base_url: "{url}", model: judge-model, max_parallel_requests: {judge_parallel}{extra_models}}}
        columns:
          - {{name: id, type: sampler, sampler: uuid}}
          - {{name: topic, type: sampler, sampler: category, params: {{values: [books, games, tools]}}}}
          - name: review
            type: llm_text
            model: writer
            prompt: "Write a short review of the {{{{ topic }}}} item {{{{ id }}}}."
          - name: facts
            type: llm_structured
            model: writer
            system_prompt: "You extract facts."
            prompt: "Facts about the {{{{ topic }}}} item {{{{ id }}}}."
            output_schema: {json.dumps(FACTS_SCHEMA)}
          - name: grade
            type: llm_judge
            model: judge
            prompt: "Review to grade: {{{{ review }}}}"
            rubric: {json.dumps(RUBRIC)}
        """)


def check_three_columns_values(rows: list[dict]) -> None:
    facts_validator = jsonschema.Draft202012Validator(FACTS_SCHEMA)
    for row in rows:
        assert row["review"] == echo_answer(f"Write a short review of the {row['topic']} item {row['id']}.")
        assert not list(facts_validator.iter_errors(row["facts"])), row["facts"]
        grade = row["grade"]
        assert set(grade) == set(RUBRIC), grade
        for verdict in grade.values():
            assert set(verdict) == {"score", "reasoning"}, verdict
            assert isinstance(verdict["score"], (int, float)) and not isinstance(verdict["score"], bool)
            assert isinstance(verdict["reasoning"], str)


# -- 1 ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_all_llm_column_types_on_two_models_complete_every_record_through_429s_and_503s(tmp_path, fake_server):
    url = fake_server(latency_ms=5, rate_429=0.10, rate_503=0.05)
    records = 200
    cfg = three_columns_config(tmp_path / "p", url, records=records)
    home = tmp_path / "home"

    proc = cli("run", str(cfg), "--run-id", "three", "--quiet", home=home)
    assert_ran(proc)
    assert proc.stdout.splitlines()[0] == "run_id: three"

    rows = export_jsonl("three", home, tmp_path / "out.jsonl")
    assert len(rows) == records, "no record dropped"
    assert len({r["id"] for r in rows}) == records
    assert list(rows[0]) == ["id", "topic", "review", "facts", "grade"], "columns in config order"
    check_three_columns_values(rows)

    status = status_json("three", home)
    assert status["status"] == "complete"
    assert status["records_dropped"] == 0 and status["records_done"] == records
    for column in ("review", "facts", "grade"):
        assert status["columns"][column]["done"] == records, status["columns"][column]
        assert status["columns"][column]["failed"] == 0

    models = server_stats(url)["models"]
    tasks = {"writer-model": 2 * records, "judge-model": records}
    faulted_429 = sum(m["rate_limited"] for m in models.values())
    faulted_503 = sum(m["server_errors"] for m in models.values())
    # The server faults ~10 % / ~5 % of distinct first attempts: it must really have happened.
    assert 0.05 * 3 * records <= faulted_429 <= 0.16 * 3 * records, models
    assert 0.015 * 3 * records <= faulted_503 <= 0.10 * 3 * records, models
    for model, expected in tasks.items():
        m = models[model]
        assert m["rate_limited"] > 0 and m["server_errors"] > 0, (model, m)
        # Retries reach the server (attempt 2 is never faulted), and only faulted calls repeat.
        assert m["requests"] == expected + m["rate_limited"] + m["server_errors"], (model, m)


# -- 2 ----------------------------------------------------------------------------------------
MARKER = "ZZ-UNPARSEABLE-ZZ"


@pytest.mark.slow
def test_answers_that_never_parse_drop_exactly_their_records(tmp_path, fake_server):
    from pipeline.generators.llm import REASKS

    url = fake_server(latency_ms=5, malformed_marker=MARKER)
    records = 100
    folder = tmp_path / "p"
    folder.mkdir()
    bad = {i for i in range(records) if i % 9 == 4}
    with open(folder / "items.jsonl", "w") as f:
        for i in range(records):
            note = f"please {MARKER} here" if i in bad else "plain item"
            f.write(json.dumps({"item": f"item-{i:03d}", "note": note}) + "\n")
    cfg = write_config(folder, f"""\
        name: llm-malformed
        num_records: {records}
        row_group_size: 25
        settings: {{retry_backoff_s: 0.02}}
        models:
          m: {{base_url: "{url}", model: facts-model, max_parallel_requests: 8}}
        columns:
          - {{name: seed, type: seed_dataset, path: items.jsonl, columns: [item, note], order: sequential}}
          - name: facts
            type: llm_structured
            model: m
            prompt: "Facts about {{{{ item }}}}: {{{{ note }}}}"
            output_schema: {json.dumps(FACTS_SCHEMA)}
          - name: blurb
            type: llm_text
            model: m
            prompt: "Blurb for {{{{ item }}}} with {{{{ facts.stars }}}} stars"
        """)
    home = tmp_path / "home"

    proc = cli("run", str(cfg), "--run-id", "malformed", "--quiet", home=home)
    assert_ran(proc)  # dropped records are not an error

    rows = export_jsonl("malformed", home, tmp_path / "out.jsonl")
    assert [r["item"] for r in rows] == [f"item-{i:03d}" for i in range(records) if i not in bad]
    validator = jsonschema.Draft202012Validator(FACTS_SCHEMA)
    for row in rows:
        assert not list(validator.iter_errors(row["facts"]))
        assert row["blurb"] == echo_answer(f"Blurb for {row['item']} with {row['facts']['stars']} stars")

    status = status_json("malformed", home)
    assert status["status"] == "complete"
    assert status["records_dropped"] == len(bad)
    assert status["records_done"] == records - len(bad)
    assert status["columns"]["facts"]["failed"] == len(bad), status["columns"]
    assert status["columns"]["facts"]["done"] == records - len(bad)
    assert status["columns"]["blurb"]["done"] == records - len(bad)

    failed = sql_json("select row_group, row_index, column_name, attempts, last_error from tasks "
                      "where state = 'failed'", home)
    assert sorted(25 * f["row_group"] + f["row_index"] for f in failed) == sorted(bad)
    for f in failed:
        assert f["column_name"] == "facts"
        assert f["attempts"] == 1, "an unusable answer is re-asked within the task, never deferred"
        assert f["last_error"].startswith("ModelOutputError"), f["last_error"]

    # One request per good cell of each column; 1 + REASKS per bad record, and its blurb never runs.
    m = server_stats(url)["models"]["facts-model"]
    assert m["requests"] == 2 * (records - len(bad)) + (1 + REASKS) * len(bad), m


# -- 3 ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_api_key_never_reaches_the_store_the_home_folder_or_any_output(tmp_path, fake_server):
    secret = f"sk-test-{uuid.uuid4().hex}-DO-NOT-LEAK"
    wrong = f"sk-wrong-{uuid.uuid4().hex}-DO-NOT-LEAK"
    needles = {"the key": secret.encode(), "the wrong key": wrong.encode()}
    url = fake_server(latency_ms=20, require_key=secret)
    records = 60
    cfg = three_columns_config(tmp_path / "p", url, records=records, writer_parallel=4, judge_parallel=4,
                               settings=", shutdown_error_window: 10",
                               extra_models=", api_key_env: PIPELINE_TEST_LLM_KEY")
    assert secret not in cfg.read_text()
    home = tmp_path / "home"
    good_env = cli_env(PIPELINE_TEST_LLM_KEY=secret)
    wrong_env = cli_env(PIPELINE_TEST_LLM_KEY=wrong)
    outputs: list[subprocess.CompletedProcess] = []

    def scan_home() -> set[str]:
        """Every file under the home folder, read whole (the database, its WAL, Parquet files...)."""
        seen = set()
        for path in home.rglob("*"):
            try:
                data = path.read_bytes() if path.is_file() else None
            except FileNotFoundError:  # a WAL or temporary file that went away meanwhile
                continue
            if data is None:
                continue
            seen.add(path.name)
            for what, needle in needles.items():
                assert needle not in data, f"{what} in {path}"
        return seen

    # The key is used: the server refuses requests without it. The home folder is read while
    # the run goes on too (the WAL holds the latest transactions).
    proc = cli_popen("run", str(cfg), "--run-id", "keyed", home=home, env=good_env)
    try:
        seen_live: set[str] = set()
        while proc.poll() is None:
            if sum(m["requests"] for m in server_stats(url)["models"].values()) >= 20:
                seen_live |= scan_home()
            time.sleep(0.02)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    outputs.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    assert_ran(outputs[-1])
    assert "state.db" in seen_live, seen_live
    rows = export_jsonl("keyed", home, home / "exports" / "keyed.jsonl", env=good_env, outputs=outputs)
    assert len(rows) == records
    check_three_columns_values(rows)
    assert server_stats(url)["models"]["writer-model"]["requests"] == 2 * records

    # A wrong key: the model preflight refuses the run (exit 2, no run created).
    proc = cli("run", str(cfg), "--run-id", "wrong-key", home=home, env=wrong_env)
    outputs.append(proc)
    assert_ran(proc, 2)
    assert "HTTP 401" in proc.stderr and "wrong-key" not in {r["run_id"] for r in sql_json(
        "select run_id from runs", home, env=good_env, outputs=outputs)}
    # Past the preflight, HTTP 401 fails the cells for good (no retry), and the run stops on its error rate.
    proc = cli("run", str(cfg), "--run-id", "wrong-key", "--no-check-models", home=home, env=wrong_env)
    outputs.append(proc)
    assert_ran(proc, 1)
    tasks = sql_json("select column_name, state, attempts, last_error from tasks where run_id = 'wrong-key' "
                     "and column_name in ('review', 'facts', 'grade')", home, env=wrong_env, outputs=outputs)
    failed = [t for t in tasks if t["state"] == "failed"]
    assert len(failed) >= 5, tasks  # the error rate (5 of the last 10 tasks) stops the run
    assert not [t for t in tasks if t["state"] == "deferred"], "a 401 is not retryable"
    for t in failed:
        assert t["attempts"] == 1 and "401" in t["last_error"], t

    for run_id in ("keyed", "wrong-key"):
        status_json(run_id, home, env=good_env, outputs=outputs)
    outputs.append(cli("sql", "select * from tasks", home=home, env=good_env, check=True))
    outputs.append(cli("runs", "--json", home=home, env=good_env, check=True))

    for proc in outputs:
        for what, needle in needles.items():
            assert needle.decode() not in proc.stdout, f"{what} in the stdout of {proc.args}"
            assert needle.decode() not in proc.stderr, f"{what} in the stderr of {proc.args}"
    names = scan_home()
    assert "state.db" in names and any(n.endswith(".parquet") for n in names), names


# -- 4 ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_429_burst_on_one_model_throttles_only_that_model_and_its_limit_recovers(tmp_path, monkeypatch):
    """In process: the run on this thread, the server in its own process, a sampler thread
    reading the server's /stats and both models' AdaptiveLimit every 10 ms."""
    import pipeline
    from pipeline import llm
    from pipeline.config import load_config

    made: list = []

    class Recorded(llm.LlmRuntime):  # the run's job makes and owns its runtime: keep a hand on it
        def __init__(self, models):
            super().__init__(models)
            made.append(self)

    monkeypatch.setattr(llm, "LlmRuntime", Recorded)

    a_max, b_max, records = 8, 4, 300
    burst_start, burst_len = 1.0, 0.6  # seconds after the run's first request (the server's clock)
    server = ServerProcess("--latency-ms", "25", "--burst-429", f"model-a:{burst_start}:{burst_len}")
    try:
        cfg = load_config(write_config(tmp_path / "p", f"""\
            name: llm-burst
            num_records: {records}
            row_group_size: 50
            settings: {{retry_backoff_s: 0.02, salvage_max_rounds: 12, max_concurrent_row_groups: 6}}
            models:
              a: {{base_url: "{server.url}", model: model-a, max_parallel_requests: {a_max}}}
              b: {{base_url: "{server.url}", model: model-b, max_parallel_requests: {b_max}}}
            columns:
              - {{name: id, type: sampler, sampler: uuid}}
              - {{name: a1, type: llm_text, model: a, prompt: "First note on {{{{ id }}}}"}}
              - {{name: a2, type: llm_text, model: a, prompt: "Second note on {{{{ id }}}}"}}
              - {{name: b1, type: llm_text, model: b, prompt: "Other note on {{{{ id }}}}"}}
            """))
        samples: list[dict] = []
        halt = threading.Event()

        def sample() -> None:
            while not halt.is_set():
                if not made:  # the run has not built its generators yet
                    time.sleep(0.01)
                    continue
                limits = made[0].limits
                stats = server_stats(server.url)
                models = stats["models"]
                samples.append({"t": stats["uptime_s"], "a_limit": limits["a"].limit, "b_limit": limits["b"].limit,
                                "a_in_use": limits["a"].in_use, "b_in_use": limits["b"].in_use,
                                "b_in_flight": models.get("model-b", {}).get("in_flight", 0),
                                "b_requests": models.get("model-b", {}).get("requests", 0)})
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            result = pipeline.run(cfg, home=tmp_path / "home", run_id="burst", check_models=False)
        finally:
            halt.set()
            sampler.join(timeout=10)
        stats = server_stats(server.url)
        end_t, final = stats["uptime_s"], stats["models"]
        burst_start += stats["first_request_s"]  # samples are in the server's uptime
    finally:
        server.stop()

    assert result.status == "complete"
    assert result.stats.records_dropped == 0
    burst_end = burst_start + burst_len
    assert end_t > burst_end + 0.2, f"the run ended at {end_t:.2f} s, before the burst was over: make it longer"
    during = [s for s in samples if burst_start + 0.15 <= s["t"] <= burst_end]
    after = [s for s in samples if s["t"] > burst_end]
    assert len(during) >= 3 and after, (len(during), len(after))

    # A: its limit fell during the burst, and came back to its maximum after it.
    assert len(made) == 1, made  # one runtime per run, shared by its three LLM columns
    limits = made[0].limits
    a_stats = limits["a"].stats()
    assert a_stats["decreases"] > 0 and a_stats["rate_limited"] > 0, a_stats
    assert min(s["a_limit"] for s in during) < a_max, during
    assert final["model-a"]["rate_limited"] > 0 and final["model-a"]["max_in_flight"] <= a_max
    assert a_stats["limit"] == a_max, a_stats
    recovered = [s for s in after if s["a_limit"] == a_max]
    assert recovered, "model A's limit never came back to its maximum during the run"
    # ...while model A still had work: the limit recovered through successes, not at the end.
    assert recovered[0]["t"] < end_t, (recovered[0], end_t)

    # B: untouched by A's 429s: full concurrency during the burst, and progress.
    b_stats = limits["b"].stats()
    assert b_stats["decreases"] == 0 and b_stats["rate_limited"] == 0, b_stats
    assert all(s["b_limit"] == b_max for s in samples)
    assert max(s["b_in_flight"] for s in during) == b_max, [s["b_in_flight"] for s in during]
    assert max(s["b_in_use"] for s in during) == b_max
    assert during[-1]["b_requests"] - during[0]["b_requests"] >= 2 * b_max, "model B starved during A's burst"
    assert final["model-b"]["max_in_flight"] == b_max
    assert final["model-b"]["requests"] == records


# -- 5 ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigint_during_llm_calls_then_resume_exports_the_uninterrupted_dataset_without_repeating_calls(
        tmp_path, fake_server):
    records, parallel = 240, 8
    base_url = fake_server(latency_ms=15)
    cut_url = fake_server(latency_ms=15)
    home = tmp_path / "home"

    base_cfg = three_columns_config(tmp_path / "base", base_url, records=records, writer_parallel=parallel,
                                    judge_parallel=parallel)
    assert_ran(cli("run", str(base_cfg), "--run-id", "straight", "--quiet", home=home))
    expected = export_jsonl("straight", home, tmp_path / "straight.jsonl")
    assert len(expected) == records
    base_requests = sum(m["requests"] for m in server_stats(base_url)["models"].values())
    assert base_requests == 3 * records

    cfg = three_columns_config(tmp_path / "cut", cut_url, records=records, writer_parallel=parallel,
                               judge_parallel=parallel)
    proc = cli_popen("run", str(cfg), "--run-id", "cut", "--quiet", home=home)
    try:
        deadline = time.monotonic() + 60
        while True:  # interrupt once a good part of the calls is done and calls are in flight
            models = server_stats(cut_url)["models"]
            done = sum(m["requests"] for m in models.values())
            in_flight = sum(m["in_flight"] for m in models.values())
            if done >= 0.3 * base_requests and in_flight > 0:
                break
            assert proc.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert out.splitlines()[0] == "run_id: cut"
    interrupted = status_json("cut", home)
    assert interrupted["status"] == "interrupted"
    assert min(c["done"] for c in interrupted["columns"].values()) < records, "interrupted mid-run"
    at_interrupt = sum(m["requests"] for m in server_stats(cut_url)["models"].values())

    assert_ran(cli("resume", "cut", "--quiet", home=home))
    got = export_jsonl("cut", home, tmp_path / "cut.jsonl")
    # The resumed process rebuilds the run from the stored config: its prompts (a judge's rubric,
    # a structured column's schema) must be exactly those of the file, in the file's order.
    differ = {i: [c for c in e if g.get(c) != e[c]] for i, (g, e) in enumerate(zip(got, expected)) if g != e}
    assert len(got) == len(expected) and not differ, (
        f"{len(differ)} records differ from the uninterrupted run (record: columns): {dict(list(differ.items())[:5])}")
    assert (tmp_path / "cut.jsonl").read_text() == (tmp_path / "straight.jsonl").read_text()

    total = sum(m["requests"] for m in server_stats(cut_url)["models"].values())
    assert at_interrupt < total, "the resume made the remaining calls"
    # Finished calls are recorded and not made again; at most those in flight may repeat.
    assert base_requests <= total <= base_requests + 2 * (2 * parallel), (total, base_requests)


def test_two_runs_in_two_threads_do_not_close_each_others_connections(tmp_path):
    """pipeline.run from two threads at once (two configs, two event loops): the run that ends
    first closes its own HTTP pool only, so the other makes no extra request."""
    import pipeline

    server = ServerProcess("--latency-ms", "20")
    try:
        def config(name: str, records: int) -> Path:
            return write_config(tmp_path / name, f"""\
                name: {name}
                num_records: {records}
                row_group_size: 10
                models:
                  m: {{base_url: "{server.url}", model: model-{name}, max_parallel_requests: 4}}
                columns:
                  - {{name: id, type: sampler, sampler: uuid}}
                  - {{name: text, type: llm_text, model: m, prompt: "{name} {{{{ id }}}}"}}
                """)

        short, long = config("short", 8), config("long", 60)
        results: dict[str, object] = {}

        def run(name: str, path: Path) -> None:
            results[name] = pipeline.run(path, home=tmp_path / f"home-{name}")

        threads = [threading.Thread(target=run, args=(name, path)) for name, path in (("long", long), ("short", short))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        stats = server_stats(server.url)["models"]
    finally:
        server.stop()
    assert results["short"].status == results["long"].status == "complete"
    assert stats["model-short"]["requests"] == 8
    assert stats["model-long"]["requests"] == 60
    assert results["long"].stats.records_dropped == 0


@pytest.mark.slow
def test_the_readme_llm_example_runs_against_a_server_that_refuses_open_schemas_in_strict_mode(tmp_path, fake_server):
    """examples/llm.yaml, pointed at the fake server, which answers 400 (as OpenAI does) to a
    strict json_schema with open objects. The example's schema is open: it must go non-strict,
    and every record comes back."""
    url = fake_server(latency_ms=2)
    text = (ROOT / "examples" / "llm.yaml").read_text().replace("http://127.0.0.1:8123/v1", url)
    assert url in text
    cfg = tmp_path / "llm.yaml"
    cfg.write_text(text.replace("num_records: 200", "num_records: 40"))
    home = tmp_path / "home"
    proc = cli("run", str(cfg), "--run-id", "readme", "--quiet", home=home, check=True, timeout=300)
    assert proc.stdout.splitlines()[0] == "run_id: readme"
    rows = export_jsonl("readme", home, tmp_path / "out.jsonl")
    assert len(rows) == 40
    assert all(r["facts"]["sentiment"] in ("negative", "neutral", "positive") for r in rows)
    assert all(set(r["quality"]) == {"helpfulness", "consistency"} for r in rows)
    models = server_stats(url)["models"]
    assert sum(m["requests"] for m in models.values()) == 40 * 3  # no 400, no re-ask


def test_strict_mode_is_asked_only_for_schemas_it_accepts():
    from pipeline.generators.llm import judge_schema, strict_compatible

    closed = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}
    assert strict_compatible(closed) and strict_compatible(judge_schema({"x": "y"}))
    assert not strict_compatible({**closed, "additionalProperties": True})
    assert not strict_compatible({k: v for k, v in closed.items() if k != "required"})
    nested_open = {**closed, "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}}}}
    assert not strict_compatible(nested_open)
    in_array = {**closed, "properties": {"a": {"type": "array", "items": {**closed, "additionalProperties": True}}}}
    assert not strict_compatible(in_array)
