"""Acceptance tests of the LLM columns, end to end, on what a run gives back: real HTTP on
127.0.0.1 against the fake OpenAI-compatible server (scripts/fake_llm_server.py), and the real
command line wherever a user would use it.

1. every LLM column type, on two models, through 429s and 503s: every record, the expected values;
2. answers that never parse drop exactly their records, and `status` says so;
3. a run interrupted by SIGINT mid-flight resumes to the uninterrupted dataset, without
   repeating the calls that had finished;
4. the README's LLM example runs against a server that refuses open schemas in strict mode,
   which is asked only for the schemas it accepts.

What stays apart (the key, one model's 429s, two runs at once) is in test_llm_pipeline_isolation.py.
"""

from __future__ import annotations

import json
import signal
import time

import jsonschema
import pytest

from tests.conftest import ROOT, cli, cli_popen
from tests.llm_run_helpers import (
    FACTS_SCHEMA,
    assert_ran,
    check_three_columns_values,
    echo_answer,
    export_jsonl,
    server_stats,
    sql_json,
    status_json,
    three_columns_config,
    write_config,
)


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


# -- 4 ----------------------------------------------------------------------------------------
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
