"""Acceptance tests of the LLM columns, end to end, on what stays apart: real HTTP on 127.0.0.1
against the fake OpenAI-compatible server (scripts/fake_llm_server.py), and the real command
line wherever a user would use it.

1. the API key never reaches the state store, the home folder or any command's output;
2. a burst of 429s on one model throttles that model only, and its limit recovers;
3. two runs in two threads of one process do not close each other's connections.

What a run gives back (values, dropped records, a resume after SIGINT) is in
test_llm_pipeline_results.py.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import ServerProcess, cli, cli_env, cli_popen
from tests.llm_run_helpers import (
    assert_ran,
    check_three_columns_values,
    export_jsonl,
    server_stats,
    sql_json,
    status_json,
    three_columns_config,
    write_config,
)


# -- 1 ----------------------------------------------------------------------------------------
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


# -- 2 ----------------------------------------------------------------------------------------
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


# -- 3 ----------------------------------------------------------------------------------------
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
