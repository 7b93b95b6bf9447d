"""The fake OpenAI-compatible server that the LLM tests and benchmarks rely on."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx
import jsonschema
import pytest

from tests.conftest import FAKE_SERVER_SCRIPT as SCRIPT
from tests.conftest import fake_server_module


fake = fake_server_module()


def chat(content, *, model="m1", **extra):
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
def serve():
    stops = []

    def start(**options):
        url, stop = fake.start_server(**options)
        stops.append(stop)
        return url

    yield start
    for stop in stops:
        stop()


_HTTP = {}


@pytest.fixture(autouse=True)
def http_client():
    # One client per test: building one costs an SSL context (tens of ms).
    with httpx.Client() as client:
        _HTTP["client"] = client
        yield client
    _HTTP.clear()


def post(url, body, **kwargs):
    return _HTTP["client"].post(url + "/chat/completions", json=body, **kwargs)


def test_the_command_prints_its_url_first_and_stops_on_sigterm():
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--port", "0", "--latency-ms", "5", "--rate-429", "0.1"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:") and line.endswith("/v1")
        url = line.split()[-1]
        response = post(url, chat("hello", model="cli"), headers={"Authorization": "Bearer x"})
        assert response.status_code in (200, 429)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_text_answers_are_deterministic_and_count_words(serve):
    url = serve()
    first = post(url, chat("the quick brown fox")).json()
    again = post(url, chat("the quick brown fox")).json()
    text = first["choices"][0]["message"]["content"]
    assert text == again["choices"][0]["message"]["content"]
    assert text.startswith("echo: ") and text.endswith("the quick brown fox")
    assert first["usage"] == {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10}
    cut = post(url, chat("the quick brown fox", max_tokens=3)).json()
    assert cut["choices"][0]["finish_reason"] == "length"
    assert len(cut["choices"][0]["message"]["content"].split()) == 3


SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 3, "maximum": 5}}, "required": ["a"]},
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 30, "maxLength": 40},
            "tag": {"enum": ["x", "y", "z"]},
            "p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "n": {"type": "integer", "exclusiveMinimum": 10},
            "ok": {"type": "boolean"},
            "maybe": {"type": ["null", "string"]},
            "when": {"type": "string", "format": "date"},
            "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 2},
            "fixed": {"const": 7},
        },
        "required": ["name", "tag", "p", "n", "ok", "items", "fixed"],
        "additionalProperties": False,
        "$defs": {"item": {"type": "object", "properties": {"k": {"type": "string", "maxLength": 3}}, "required": ["k"]}},
    },
    {"type": "array", "items": {"anyOf": [{"type": "integer", "maximum": -5}, {"type": "string"}]}},
    {"allOf": [{"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}]},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_values_generated_from_a_schema_satisfy_it(schema):
    for seed in ("a", "b", "c"):
        jsonschema.validate(fake.sample_from_schema(schema, seed), schema)


def test_json_schema_requests_get_a_valid_object(serve):
    url = serve()
    schema = SCHEMAS[1]
    response_format = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": False}}
    body = post(url, chat("give me one", response_format=response_format)).json()
    jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), schema)


def test_strict_mode_refuses_open_objects_as_openai_does(serve):
    url = serve()
    closed = {"type": "object", "properties": {"k": {"type": "string"}}, "required": ["k"], "additionalProperties": False}
    for schema, status in [(closed, 200), (SCHEMAS[1], 400), ({**closed, "required": []}, 400),
                           ({**closed, "properties": {"k": {"type": "object", "properties": {}}}}, 400)]:
        response_format = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}
        response = post(url, chat("strict?", response_format=response_format))
        assert response.status_code == status, schema


def test_faults_hit_first_attempts_only_and_deterministically(serve):
    url = serve(rate_429=0.3, rate_503=0.3, retry_after_s=2)
    other = serve(rate_429=0.3, rate_503=0.3, retry_after_s=2)
    prompts = [f"prompt {i}" for i in range(40)]
    first = [post(url, chat(p)) for p in prompts]
    statuses = [r.status_code for r in first]
    assert {200, 429, 503} <= set(statuses)
    assert all(r.headers["Retry-After"] == "2" for r in first if r.status_code == 429)
    assert [post(other, chat(p)).status_code for p in prompts] == statuses
    assert all(post(url, chat(p)).status_code == 200 for p in prompts)


def test_faults_every_attempt_never_lets_up(serve):
    url = serve(rate_503=1.0, faults_every_attempt=True)
    assert [post(url, chat("same")).status_code for _ in range(3)] == [503, 503, 503]


def test_the_malformed_marker_always_spoils_structured_output(serve):
    url = serve(malformed_marker="SPOIL")
    schema = SCHEMAS[0]
    response_format = {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}
    for i in range(6):
        text = post(url, chat(f"SPOIL {i}", response_format=response_format)).json()["choices"][0]["message"]["content"]
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            continue
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, schema)


def test_a_burst_rate_limits_one_model_for_its_window(serve, http_client):
    url = serve(burst_429=["m1:0:0.4"])
    assert http_client.get(url.removesuffix("/v1") + "/stats").json()["first_request_s"] is None
    # A preflight's request does not start the window (it falls in it): the run's first request does.
    assert post(url, chat("x", model="m1"), headers={"X-Pipeline-Preflight": "1"}).status_code == 429
    assert http_client.get(url.removesuffix("/v1") + "/stats").json()["first_request_s"] is None
    during = post(url, chat("x", model="m1"))
    assert during.status_code == 429 and during.headers["Retry-After"] == "0"
    assert post(url, chat("x", model="m2")).status_code == 200
    time.sleep(0.45)
    assert post(url, chat("x", model="m1")).status_code == 200
    assert http_client.get(url.removesuffix("/v1") + "/stats").json()["first_request_s"] >= 0
    assert fake.Burst.parse("llama3:8b:1:2.5") == fake.Burst("llama3:8b", 1.0, 2.5)


def test_a_required_key_is_checked_and_never_echoed(serve):
    url = serve(require_key="sk-fake-123")
    refused = post(url, chat("x"), headers={"Authorization": "Bearer nope-999"})
    assert refused.status_code == 401 and "nope-999" not in refused.text
    assert post(url, chat("x")).status_code == 401
    assert post(url, chat("x"), headers={"Authorization": "Bearer sk-fake-123"}).status_code == 200
    assert "sk-fake-123" not in repr(fake.FakeOptions(require_key="sk-fake-123"))


def test_status_markers_answer_with_that_status(serve, http_client):
    url = serve()
    response = post(url, chat("[[status:429]] [[retry-after:7]]"))
    assert response.status_code == 429 and response.headers["Retry-After"] == "7"
    assert post(url, chat("[[status:409]]")).status_code == 409
    assert http_client.get(url.removesuffix("/v1") + "/nowhere").status_code == 404
    assert http_client.post(url + "/chat/completions", content=b"{not json").status_code == 400


async def test_64_concurrent_requests_are_served_at_once_with_accurate_latency(serve):
    # A latency long enough for all 64 to be sent before the first answer, even on a loaded machine.
    url = serve(latency_ms=1500)
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(limits=limits, timeout=10) as client:
        started = time.perf_counter()
        responses = await asyncio.gather(
            *(client.post(url + "/chat/completions", json=chat(f"c{i}", model="wide")) for i in range(64))
        )
        elapsed = time.perf_counter() - started
        stats = (await client.get(url.removesuffix("/v1") + "/stats")).json()
    assert all(r.status_code == 200 for r in responses)
    assert elapsed >= 1.5  # the latency is honoured (an upper bound would time the machine's load)
    assert stats["models"]["wide"]["max_in_flight"] == 64  # served at once
    assert stats["models"]["wide"]["requests"] == 64
    assert stats["models"]["wide"]["in_flight"] == 0


def test_connections_are_kept_alive(serve):
    url = serve()
    with httpx.Client(limits=httpx.Limits(max_connections=1)) as client:
        for i in range(5):
            response = client.post(url + "/chat/completions", json=chat(str(i)))
            assert response.status_code == 200
            assert response.headers["Connection"] == "keep-alive"


def test_served_models_are_listed_and_others_get_404_and_preflight_requests_are_counted_apart(serve, http_client):
    url = serve(models=("m1", "m2"), require_key="k")
    auth = {"Authorization": "Bearer k"}
    assert http_client.get(url + "/models").status_code == 401
    listed = http_client.get(url + "/models", headers=auth).json()
    assert [m["id"] for m in listed["data"]] == ["m1", "m2"]
    unknown = post(url, chat("hi", model="m3"), headers=auth)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert post(url, chat("hi", model="m1", max_tokens=1), headers={**auth, "X-Pipeline-Preflight": "1"}).status_code == 200
    assert post(url, chat("hi", model="m1"), headers=auth).status_code == 200
    stats = http_client.get(url.removesuffix("/v1") + "/stats").json()
    assert stats["models"]["m1"]["requests"] == 1 and "m3" not in stats["models"]
    assert stats["preflight"]["list_models"] == 2 and stats["preflight"]["models"]["m1"]["requests"] == 1
    assert stats["unknown_model"] == 1
