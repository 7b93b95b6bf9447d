"""What real servers answer, through the real command line over real HTTP on 127.0.0.1
(contract section 10): each answer shape of issue 10 from a fake server that returns exactly
that body; finish_reason in `tasks`; truncated text answers in `status`; empty prompts; missing
values in templates.
"""

from __future__ import annotations

import json
import signal
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import POSTGRES_URL, cli, cli_popen
from tests.llm_run_helpers import echo_answer, export_jsonl, server_stats, sql_json, status_json

SCHEMA = {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}

# shape -> (the reply the server sends; a list: one per request of the conversation,
#           the exported value, or None when the record is dropped, requests made)
STRUCTURED = {
    "think": ({"content": '<think>I could output {"draft": 1} here.</think>\n{"command": "think"}'},
              {"command": "think"}, 1),
    "prose_before": ({"content": 'Sure! Here is the JSON: {"command": "before"}'}, {"command": "before"}, 1),
    "prose_after": ({"content": '{"command": "after"}\nLet me know if you need anything else!'},
                    {"command": "after"}, 1),
    "fence_backticks": ({"content": '```json\n{"command": "run ```make``` first"}\n```'},
                        {"command": "run ```make``` first"}, 1),
    "reasoning_only": ({"content": "", "reasoning_content": '{"command": "in reasoning"}'}, None, 3),
    "whitespace": ({"content": " \n\t "}, None, 3),
    "cut_by_length": ({"content": '{"command": "cut"}', "finish_reason": "length"}, None, 3),
    "empty_then_good": ([{"content": ""}, {"content": '{"command": "second"}'}], {"command": "second"}, 2),
}

# shape -> (reply, exported value or None, requests)
TEXT = {
    "fine": ({"content": "A fine answer."}, "A fine answer.", 1),
    "cut": ({"content": "An answer cut at the", "finish_reason": "length"}, "An answer cut at the", 1),
    "cut_too": ({"content": "Another cut", "finish_reason": "length"}, "Another cut", 1),
    "reasoning_only": ({"content": "", "reasoning_content": "The answer is 42."}, None, 3),
    "null_with_reasoning": ({"content": None, "reasoning": "Thinking..."}, None, 3),
    "whitespace": ({"content": "   \n"}, None, 3),
}


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def shapes_config(folder: Path, url: str, shapes: dict, column: str) -> Path:
    """One record per shape (a seed file, in order); the prompt names the shape's reply."""
    write(folder, "shapes.csv", "shape\n" + "\n".join(shapes) + "\n")
    if column == "llm_structured":
        extra = f"output_schema: {json.dumps(SCHEMA)}"
    else:
        extra = "max_tokens: 50"
    return write(folder, "cfg.yaml", f"""\
        name: shapes
        num_records: {len(shapes)}
        row_group_size: {len(shapes)}
        seed: 1
        settings: {{retry_backoff_s: 0.02}}
        models:
          m: {{base_url: "{url}", model: m1, max_parallel_requests: 4}}
        columns:
          - {{name: s, type: seed_dataset, path: shapes.csv, columns: [shape], order: sequential}}
          - name: answer
            type: {column}
            model: m
            prompt: "Answer for {{{{ shape }}}} [[reply:{{{{ shape }}}}]]"
            {extra}
        """)


def run(cfg: Path, run_id: str, home: Path, db: str | None = None):
    return cli("run", str(cfg), "--run-id", run_id, "--quiet", home=home, db=db)


def tasks_of(run_id: str, home: Path, db: str | None = None) -> list[dict]:
    return json.loads(cli("sql", f"SELECT row_index, state, requests, finish_reason, last_error FROM tasks "
                                 f"WHERE run_id = '{run_id}' AND column_name = 'answer' ORDER BY row_index",
                          "--json", home=home, db=db, check=True).stdout)


@pytest.mark.slow
def test_each_structured_answer_shape_over_http_is_parsed_or_fails_after_its_reasks(tmp_path, fake_server):
    url = fake_server(latency_ms=1, replies={name: reply for name, (reply, _, _) in STRUCTURED.items()})
    home = tmp_path / "home"
    cfg = shapes_config(tmp_path / "p", url, STRUCTURED, "llm_structured")
    proc = run(cfg, "st", home)
    assert proc.returncode == 0, proc.stderr
    rows = {row["shape"]: row["answer"] for row in export_jsonl("st", home, tmp_path / "out.jsonl")}
    assert rows == {shape: value for shape, (_, value, _) in STRUCTURED.items() if value is not None}
    assert server_stats(url)["models"]["m1"]["requests"] == sum(n for _, _, n in STRUCTURED.values())
    # Compaction kept the failed rows, with why the model stopped the last time.
    failed = {list(STRUCTURED)[row["row_index"]]: row for row in tasks_of("st", home)}
    assert set(failed) == {"reasoning_only", "whitespace", "cut_by_length"}
    assert all(row["state"] == "failed" and row["requests"] == 3 for row in failed.values())
    assert failed["cut_by_length"]["finish_reason"] == "length"
    assert failed["whitespace"]["finish_reason"] == "stop"
    assert "reasoning" in failed["reasoning_only"]["last_error"]
    assert "token limit" in failed["cut_by_length"]["last_error"]


@pytest.mark.parametrize("store", ["sqlite", "postgres"])
@pytest.mark.slow
def test_text_answers_empty_ones_fail_and_length_cut_ones_are_kept_and_counted(tmp_path, fake_server, store, request):
    db = None
    if store == "postgres":
        if not POSTGRES_URL:
            pytest.skip("PIPELINE_TEST_POSTGRES_URL is not set")
        db = request.getfixturevalue("postgres_url")
    url = fake_server(latency_ms=1, replies={name: reply for name, (reply, _, _) in TEXT.items()})
    home = tmp_path / "home"
    cfg = shapes_config(tmp_path / "p", url, TEXT, "llm_text")
    proc = run(cfg, "tx", home, db)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out.jsonl"
    cli("export", "tx", "--output", str(out), "--format", "jsonl", home=home, db=db, check=True)
    rows = {row["shape"]: row["answer"] for row in map(json.loads, out.read_text().splitlines())}
    assert rows == {shape: value for shape, (_, value, _) in TEXT.items() if value is not None}
    assert server_stats(url)["models"]["m1"]["requests"] == sum(n for _, _, n in TEXT.values())
    status = json.loads(cli("status", "tx", "--json", home=home, db=db, check=True).stdout)
    assert status["columns"]["answer"]["truncated"] == 2
    assert status["columns"]["shape"]["truncated"] == 0
    text = cli("status", "tx", home=home, db=db, check=True).stdout
    assert "truncated" in text
    assert any(line.split()[0] == "answer" and line.split()[-1] == "2" for line in text.splitlines() if line.strip())
    failed = {list(TEXT)[row["row_index"]]: row for row in tasks_of("tx", home, db)}
    assert set(failed) == {"reasoning_only", "null_with_reasoning", "whitespace"}
    assert all(row["requests"] == 3 for row in failed.values())


def test_every_length_cut_text_answer_is_counted_truncated_in_status(tmp_path, fake_server):
    url = fake_server(latency_ms=1)
    home = tmp_path / "home"
    cfg = write(tmp_path / "p", "cfg.yaml", f"""\
        name: cut
        num_records: 60
        row_group_size: 20
        seed: 1
        models:
          m: {{base_url: "{url}", model: m1}}
        columns:
          - {{name: id, type: sampler, sampler: uuid}}
          - {{name: short, type: llm_text, model: m, max_tokens: 3, prompt: "Write about {{{{ id }}}} at length"}}
          - {{name: long, type: llm_text, model: m, prompt: "Write about {{{{ id }}}}"}}
        """)
    assert run(cfg, "cut", home).returncode == 0
    columns = status_json("cut", home)["columns"]
    assert columns["short"]["truncated"] == 60
    assert columns["long"]["truncated"] == 0 and columns["id"]["truncated"] == 0


@pytest.mark.slow
def test_finish_reason_is_in_tasks_while_the_row_group_is_live(tmp_path, fake_server):
    url = fake_server(latency_ms=1)
    home = tmp_path / "home"
    # Record 1's slow column holds the row group live; record 0's answers are done meanwhile.
    cfg = write(tmp_path / "p", "cfg.yaml", f"""\
        name: live
        num_records: 2
        row_group_size: 2
        seed: 1
        models:
          m: {{base_url: "{url}", model: m1, timeout_s: 300}}
        columns:
          - {{name: id, type: sampler, sampler: uuid}}
          - {{name: quick, type: llm_text, model: m, max_tokens: 2, prompt: "Say {{{{ id }}}} and more words"}}
          - name: slow
            type: llm_text
            model: m
            prompt: "{{{{ id }}}} [[sleep-ms:120000]]"
        """)
    proc = cli_popen("run", str(cfg), "--run-id", "live", "--quiet", home=home)
    try:
        deadline = time.monotonic() + 60
        rows: list = []
        while time.monotonic() < deadline:
            if (home / "state.db").exists():
                found = cli("sql", "SELECT column_name, state, finish_reason FROM tasks WHERE column_name = 'quick'",
                            "--json", home=home)
                if found.returncode == 0:
                    rows = json.loads(found.stdout)
                    if len(rows) == 2 and all(r["state"] == "done" for r in rows):
                        break
            time.sleep(0.2)
        assert rows and all(r["finish_reason"] == "length" for r in rows), rows
        live = cli("status", "live", "--json", home=home, check=True)
        assert json.loads(live.stdout)["columns"]["quick"]["truncated"] == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    # The run is incomplete (killed): its rows are still there, finish_reason with them.
    rows = sql_json("SELECT finish_reason FROM tasks WHERE column_name = 'quick'", home)
    assert [r["finish_reason"] for r in rows] == ["length", "length"]


NOTES_FNS = '''
def notes(row):
    return None if row["n"] % 2 == 0 else f"note {row['n']}"
'''


def notes_config(folder: Path, url: str, prompt: str) -> Path:
    write(folder, "notes_fns.py", NOTES_FNS)
    return write(folder, "cfg.yaml", f"""\
        name: notes
        num_records: 10
        row_group_size: 10
        seed: 4
        models:
          m: {{base_url: "{url}", model: m1}}
        columns:
          - {{name: n, type: sampler, sampler: integer, params: {{low: 0, high: 1000}}}}
          - {{name: notes, type: python, function: "notes_fns:notes", requires: [n]}}
          - {{name: shown, type: expression, expr: "[{{{{ notes }}}}]"}}
          - {{name: answer, type: llm_text, model: m, prompt: {json.dumps(prompt)}}}
        """)


@pytest.mark.slow
def test_a_missing_value_renders_as_empty_text_in_expressions_and_prompts(tmp_path, fake_server):
    url = fake_server(latency_ms=1)
    home = tmp_path / "home"
    cfg = notes_config(tmp_path / "p", url, "Notes: {{ notes }}")
    assert run(cfg, "nn", home).returncode == 0
    rows = export_jsonl("nn", home, tmp_path / "out.jsonl")
    assert len(rows) == 10 and any(r["notes"] is None for r in rows)
    for r in rows:
        text = "" if r["notes"] is None else r["notes"]
        assert r["shown"] == f"[{text}]"
        assert r["answer"] == echo_answer(f"Notes: {text}")


@pytest.mark.slow
def test_a_prompt_that_renders_empty_fails_its_cell_without_a_request(tmp_path, fake_server):
    url = fake_server(latency_ms=1)
    home = tmp_path / "home"
    cfg = notes_config(tmp_path / "p", url, "{{ notes }}")
    proc = run(cfg, "empty", home)
    assert proc.returncode == 0, proc.stderr
    rows = export_jsonl("empty", home, tmp_path / "out.jsonl")
    assert rows and all(r["notes"] is not None for r in rows)
    empty = 10 - len(rows)
    assert empty > 0
    assert server_stats(url)["models"]["m1"]["requests"] == len(rows)  # none for the empty prompts
    status = status_json("empty", home)
    assert status["columns"]["answer"]["failed"] == empty
    [failure] = status["failures"]
    assert failure["count"] == empty and "prompt rendered to empty text" in failure["example"]
    assert "'answer'" in failure["example"]
    failed = sql_json("SELECT attempts, requests FROM tasks WHERE state = 'failed'", home)
    assert len(failed) == empty and all(r["attempts"] == 1 and not r["requests"] for r in failed)


def structured_config(folder: Path, url: str, schema: dict, *, records: int) -> Path:
    """One llm_structured column, `answer`, with ``schema``, on model `m` at ``url``."""
    return write(folder, "cfg.yaml", f"""\
        name: structured
        num_records: {records}
        models: {{m: {{base_url: "{url}", model: m1}}}}
        columns:
          - {{name: answer, type: llm_structured, model: m, prompt: "Facts.", output_schema: {json.dumps(schema)}}}
        """)


@pytest.mark.parametrize(("schema", "words"), [
    ({"$ref": "http://127.0.0.1:9/facts.json"}, ["http://127.0.0.1:9/facts.json"]),
    ({"$schema": "http://example.com/my-draft", "type": "object"}, ["http://example.com/my-draft"]),
    ({"properties": {"x": {"type": "string", "pattern": "[a-"}}}, ["properties/x/pattern"]),
])
def test_an_output_schema_the_answers_validator_cannot_use_is_refused_before_anything_is_created(
        tmp_path, schema, words):
    cfg = structured_config(tmp_path, "http://127.0.0.1:9/v1", schema, records=2)
    home = tmp_path / "home"
    for command in ("validate", "run"):
        proc = cli(command, str(cfg), "--no-check-models", home=home) if command == "run" else cli(command, str(cfg))
        assert proc.returncode == 2, proc.stderr
        for word in ["column 'answer'", "not a valid JSON Schema", *words]:
            assert word in proc.stderr, (word, proc.stderr)
    assert not home.exists()


def test_a_stored_schema_this_version_cannot_use_is_fixed_by_resuming_with_the_config(tmp_path, fake_server):
    """A run created by an earlier version whose output_schema the answers' validator refuses
    (Python's `\\Z` in a pattern; jsonschema-rs takes ECMA 262 regexes): resume says how to fix
    it, and resuming with the fixed config runs it; the card of the run still reads."""
    import sqlite3

    url = fake_server(latency_ms=1)
    cfg = structured_config(tmp_path, url, SCHEMA, records=3)
    home = tmp_path / "home"
    assert cli("run", str(cfg), "--run-id", "old", "--create-only", home=home).returncode == 0
    with sqlite3.connect(home / "state.db") as con:  # as the earlier version stored it
        stored = json.loads(con.execute("SELECT config FROM runs WHERE run_id = 'old'").fetchone()[0])
        stored["columns"][0]["output_schema"]["properties"]["command"]["pattern"] = "^.*\\Z"
        con.execute("UPDATE runs SET config = ? WHERE run_id = 'old'", (json.dumps(stored),))
    proc = cli("resume", "old", home=home)
    assert proc.returncode == 2, proc.stderr
    for word in ["column 'answer'", "not a valid JSON Schema", "ECMA 262", "earlier version",
                 f"`pipeline resume old --config FILE --home {home}`"]:
        assert word in proc.stderr, (word, proc.stderr)
    proc = cli("resume", "old", "--config", str(cfg), home=home)
    assert proc.returncode == 0, proc.stderr
    assert len(export_jsonl("old", home, tmp_path / "out.jsonl")) == 3
    assert cli("export", "old", "--output", str(tmp_path / "card"), "--card", home=home).returncode == 0
