"""Plain helpers of the end-to-end LLM tests (tests/test_llm_pipeline_*.py and others): the fake
server's /stats, a config file, the fake server's answer to a prompt, the real CLI's export,
status and sql as JSON, and the three-column pipeline (llm_text, llm_structured, llm_judge on
two models) with the check of its values."""

from __future__ import annotations

import hashlib
import json
import subprocess
import textwrap
import urllib.request
from pathlib import Path

import jsonschema

from tests.conftest import cli


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
