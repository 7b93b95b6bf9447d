"""The LLM client and the llm_* generators, over real HTTP against the fake server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import email.utils
import pathlib
import pickle
import socket
import time
import traceback
from types import SimpleNamespace

import pytest

from pipeline.errors import (
    ConfigError,
    GenerationError,
    ModelConnectionError,
    ModelRateLimitError,
    ModelServerError,
    ModelTimeoutError,
    is_retryable,
)
from pipeline.generators.llm import judge_schema, make_llm_generator
from pipeline.llm import (
    LlmClient,
    LlmRuntime,
    ModelEndpoint,
    ModelOutputError,
    ModelRequestError,
    parse_retry_after,
)

from tests.conftest import fake_server_module

SECRET = "sk-test-5ecret-do-not-leak-0123456789"
KEY_ENV = "PIPELINE_TEST_LLM_KEY"


fake = fake_server_module()


@pytest.fixture(scope="module")
def server_url():
    url, stop = fake.start_server(latency_ms=5, malformed_marker="SPOIL")
    yield url
    stop()


@pytest.fixture(scope="module")
def keyed_url():
    url, stop = fake.start_server(require_key=SECRET)
    yield url
    stop()


@pytest.fixture
async def client():
    client = LlmClient(max_connections=16)
    yield client
    await client.aclose()


@pytest.fixture
def secret_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def endpoint(url, **overrides):
    fields = {"alias": "writer", "base_url": url, "model": "fake-model", "timeout_s": 5.0}
    return ModelEndpoint(**{**fields, **overrides})


def user(text):
    return [{"role": "user", "content": text}]


def make_config(url, **model_overrides):
    model = {"base_url": url, "model": "fake-model", "api_key_env": None, "max_parallel_requests": 4, "timeout_s": 5}
    model.update(model_overrides)
    return SimpleNamespace(models={"writer": SimpleNamespace(**model)}, base_dir=pathlib.Path("."))


def make_column(name="out", type="llm_text", prompt="Say {{ word }}", **extra):
    fields = {"system_prompt": None, "model": "writer", "temperature": None, "max_tokens": None}
    fields.update(extra)
    return SimpleNamespace(name=name, type=type, prompt=prompt, **fields)


@pytest.fixture
async def generator_of():
    """``generator_of(column, config)``: the column's generator on a runtime of its own (as a
    run's job owns one), closed at the end."""
    owned = []

    def make(column, config):
        owned.append(LlmRuntime(config.models))
        return make_llm_generator(column, config, runtime=owned[-1])

    yield make
    for runtime in owned:
        await runtime.aclose()


# --- the client ------------------------------------------------------------------------------


async def test_a_completion_returns_the_text_and_token_counts(client, server_url):
    completion = await client.complete(endpoint(server_url), user("one two three"), temperature=0.5, max_tokens=50)
    assert completion.text.startswith("echo: ") and completion.text.endswith("one two three")
    assert (completion.prompt_tokens, completion.completion_tokens) == (3, 5)


async def test_max_tokens_reaches_the_server(client, server_url):
    completion = await client.complete(endpoint(server_url), user("a b c d e f"), max_tokens=2)
    assert len(completion.text.split()) == 2


@pytest.mark.parametrize(
    ("status", "error"),
    [(408, ModelTimeoutError), (409, ModelServerError), (500, ModelServerError), (502, ModelServerError),
     (503, ModelServerError), (429, ModelRateLimitError)],
)
async def test_retryable_statuses_map_to_retryable_errors(client, server_url, status, error):
    with pytest.raises(error) as caught:
        await client.complete(endpoint(server_url), user(f"[[status:{status}]]"))
    assert is_retryable(caught.value)
    assert f"HTTP {status}" in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_other_client_errors_fail_for_good(client, server_url, status):
    with pytest.raises(ModelRequestError) as caught:
        await client.complete(endpoint(server_url), user(f"[[status:{status}]]"))
    assert caught.value.status_code == status
    assert not is_retryable(caught.value)
    assert "injected" in str(caught.value)  # a snippet of the body
    assert caught.value.__cause__ is None and caught.value.__context__ is None


async def test_retry_after_in_seconds_is_kept(client, server_url):
    with pytest.raises(ModelRateLimitError) as caught:
        await client.complete(endpoint(server_url), user("[[status:429]] [[retry-after:3]]"))
    assert caught.value.retry_after_s == 3.0


async def test_retry_after_as_an_http_date_becomes_seconds(client, server_url):
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    with pytest.raises(ModelRateLimitError) as caught:
        await client.complete(endpoint(server_url), user(f"[[status:429]] [[retry-after:{when}]]"))
    assert 25 <= caught.value.retry_after_s <= 31


async def test_a_429_without_retry_after_has_none(client, server_url):
    with pytest.raises(ModelRateLimitError) as caught:
        await client.complete(endpoint(server_url), user("[[status:429]]"))
    assert caught.value.retry_after_s is None


def test_retry_after_parsing():
    assert parse_retry_after("2.5") == 2.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("nan") is None


async def test_a_slow_server_times_out(client, server_url):
    started = time.perf_counter()
    with pytest.raises(ModelTimeoutError) as caught:
        await client.complete(endpoint(server_url, timeout_s=0.2), user("[[sleep-ms:3000]]"))
    assert time.perf_counter() - started < 2
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    # The pool is still good afterwards.
    assert (await client.complete(endpoint(server_url), user("after"))).text


async def test_a_closed_port_is_a_connection_error(client):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ModelConnectionError) as caught:
        await client.complete(endpoint(f"http://127.0.0.1:{port}/v1"), user("hi"))
    assert is_retryable(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_messages_name_the_endpoint_without_credentials_or_query():
    where = endpoint("http://user:pa55word@127.0.0.1:8000/v1?token=t0k").where
    assert where == "model 'writer' at http://127.0.0.1:8000/v1"


async def test_the_key_is_sent_from_the_env_var(client, keyed_url, secret_env):
    completion = await client.complete(endpoint(keyed_url, api_key_env=KEY_ENV), user("hi"))
    assert completion.text


async def test_a_wrong_key_is_a_401_that_fails_for_good(client, keyed_url, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(ModelRequestError) as caught:
        await client.complete(endpoint(keyed_url, api_key_env=KEY_ENV), user("hi"))
    assert caught.value.status_code == 401


async def test_an_unset_key_variable_fails_for_good_and_names_it(client, keyed_url, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ModelRequestError, match=KEY_ENV):
        await client.complete(endpoint(keyed_url, api_key_env=KEY_ENV), user("hi"))


async def test_concurrent_requests_share_the_pool(server_url):
    client = LlmClient(max_connections=8)
    try:
        texts = await asyncio.gather(*(client.complete(endpoint(server_url), user(f"n{i}")) for i in range(40)))
    finally:
        await client.aclose()
    assert len({c.text for c in texts}) == 40


async def test_the_pool_opens_on_first_use_and_reopens_after_aclose(server_url):
    client = LlmClient(max_connections=2)
    assert "closed" in repr(client)
    assert (await client.complete(endpoint(server_url), user("first"))).text
    assert "open" in repr(client)
    await client.aclose()
    assert "closed" in repr(client)
    assert (await client.complete(endpoint(server_url), user("again"))).text
    await client.aclose()


async def test_a_request_from_another_running_loop_gets_a_one_off_connection(client, server_url):
    assert (await client.complete(endpoint(server_url), user("on the pool's loop"))).text
    # Another thread with its own loop, while the pool's loop runs: the pool is not touched.
    other = await asyncio.to_thread(asyncio.run, client.complete(endpoint(server_url), user("elsewhere")))
    assert other.text.endswith("elsewhere")
    assert (await client.complete(endpoint(server_url), user("still the pool"))).text


@pytest.mark.parametrize("status", [301, 307])
async def test_redirects_are_not_followed_and_fail_for_good(client, server_url, status):
    with pytest.raises(ModelRequestError) as caught:
        await client.complete(endpoint(server_url), user(f"[[status:{status}]]"))
    assert caught.value.status_code == status


@pytest.mark.parametrize("base_url", ["ftp://127.0.0.1:21/v1", "http://[::1/v1", "http:///v1"])
async def test_a_bad_base_url_fails_for_good(client, base_url):
    with pytest.raises(ModelRequestError, match="bad base_url") as caught:
        await client.complete(endpoint(base_url), user("hi"))
    assert not is_retryable(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def _clear_proxy_env(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


async def test_proxies_come_from_the_environment(server_url, monkeypatch):
    """HTTP_PROXY routes the request through the proxy (here the fake server, which answers
    404 to an absolute-form target, naming it); NO_PROXY bypasses it."""
    _clear_proxy_env(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", server_url.removesuffix("/v1"))
    client = LlmClient(max_connections=2)
    try:
        with pytest.raises(ModelRequestError) as caught:
            await client.complete(endpoint("http://llm.example.invalid/v1"), user("through the proxy"))
        assert caught.value.status_code == 404
        assert "http://llm.example.invalid/v1/chat/completions" in str(caught.value)
    finally:
        await client.aclose()
    with socket.socket() as sock:  # a proxy that is not there: only a bypass gets through
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{sock.getsockname()[1]}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    client = LlmClient(max_connections=2)
    try:
        assert (await client.complete(endpoint(server_url), user("no proxy"))).text.endswith("no proxy")
    finally:
        await client.aclose()
    monkeypatch.delenv("NO_PROXY")
    client = LlmClient(max_connections=2)
    try:
        with pytest.raises(ModelConnectionError):
            await client.complete(endpoint(server_url), user("proxy gone"))
    finally:
        await client.aclose()


_COMPLETION = b'{"choices": [{"message": {"content": "hello there"}}], "usage": {"prompt_tokens": 2}}'


def _chunked(body: bytes, size: int = 7) -> bytes:
    parts = [b"%x\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(parts) + b"0\r\n\r\n"


def _gzipped(body: bytes) -> bytes:
    import gzip

    return gzip.compress(body)


RAW_ANSWERS = {
    "chunked": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
               + _chunked(_COMPLETION),
    "gzip": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\n\r\n" % len(_gzipped(_COMPLETION)) + _gzipped(_COMPLETION),
    "truncated": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                 + _COMPLETION[:20],
    "not http": b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    "nothing": b"",
}


@pytest.fixture(scope="module")
def raw_server():
    """A server that answers every request with RAW_ANSWERS[<the request's last word>], then
    closes the connection: answers the fake server cannot give."""
    import socketserver
    import threading

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = self.request.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            while len(body) < length:
                body += self.request.recv(65536)
            import json

            word = json.loads(body)["messages"][-1]["content"].split("|")[-1]
            self.request.sendall(RAW_ANSWERS[word])

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("kind", ["chunked", "gzip"])
async def test_chunked_and_compressed_answers_are_read(client, raw_server, kind):
    completion = await client.complete(endpoint(raw_server), user(f"answer|{kind}"))
    assert completion.text == "hello there" and completion.prompt_tokens == 2


@pytest.mark.parametrize("kind", ["truncated", "not http", "nothing"])
async def test_a_broken_answer_is_a_retryable_connection_error(client, raw_server, kind):
    with pytest.raises(ModelConnectionError) as caught:
        await client.complete(endpoint(raw_server), user(f"answer|{kind}"))
    assert is_retryable(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None


# --- no secret anywhere -----------------------------------------------------------------------


def _everything_said_about(exc):
    rendered = "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())
    return " ".join([str(exc), repr(exc), rendered, repr(pickle.loads(pickle.dumps(exc)))])


async def test_no_error_repr_or_traceback_shows_the_key(keyed_url, server_url, secret_env, generator_of):
    config = make_config(keyed_url, api_key_env=KEY_ENV)
    generator = generator_of(make_column(prompt="[[status:{{ code }}]]"), config)
    said = [repr(generator), repr(generator.runtime), repr(generator.runtime.client), repr(generator.endpoint),
            repr(generator.limit), repr(vars(generator))]
    for code in (400, 429, 500):  # the key is right, so the server answers with the marked status
        with pytest.raises(Exception) as caught:
            await generator.agenerate({"code": code})
        said.append(_everything_said_about(caught.value))
    # A 401 (the server wants another key) and a timeout, also with locals in the traceback.
    other = make_config(server_url, api_key_env=KEY_ENV, timeout_s=0.1)
    slow = generator_of(make_column(prompt="[[sleep-ms:{{ ms }}]]"), other)
    with pytest.raises(ModelTimeoutError) as caught:
        await slow.agenerate({"ms": 2000})
    said.append(_everything_said_about(caught.value))
    wrong_key = make_config(keyed_url, api_key_env="PIPELINE_TEST_OTHER_KEY")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PIPELINE_TEST_OTHER_KEY", "sk-other")
        with pytest.raises(ModelRequestError) as caught:
            await generator_of(make_column(), wrong_key).agenerate({"word": "x"})
    said.append(_everything_said_about(caught.value))
    assert all(SECRET not in text for text in said)
    assert all("sk-other" not in text for text in said)


async def test_no_connection_or_broken_answer_error_shows_the_key(client, raw_server, secret_env):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    said = []
    for url, text in ((closed, "hi"), (raw_server, "answer|not http"), (raw_server, "answer|truncated")):
        with pytest.raises(ModelConnectionError) as caught:
            await client.complete(endpoint(url, api_key_env=KEY_ENV), user(text))
        said.append(_everything_said_about(caught.value))
    assert all(SECRET not in text for text in said)


# --- the generators ---------------------------------------------------------------------------


async def test_llm_text_renders_its_prompts_and_counts_usage(server_url, generator_of):
    generator = generator_of(
        make_column(prompt="Say {{ word }} twice", system_prompt="You are {{ role }}."), make_config(server_url)
    )
    assert generator.strategy == "cell" and generator.outputs == ("out",) and generator.is_async
    value = await generator.agenerate({"word": "banana", "role": "terse"})
    assert value.endswith("Say banana twice")
    assert generator.usage == {"requests": 1, "prompt_tokens": 6, "completion_tokens": 5}


async def test_an_undefined_variable_in_the_prompt_fails_the_cell(server_url, generator_of):
    generator = generator_of(make_column(prompt="{{ missing }}"), make_config(server_url))
    with pytest.raises(Exception, match="missing"):
        await generator.agenerate({})
    assert generator.usage["requests"] == 0


SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 20}, "stars": {"type": "integer", "minimum": 1, "maximum": 5}},
    "required": ["title", "stars"],
    "additionalProperties": False,
}


async def test_llm_structured_returns_the_validated_object(server_url, generator_of):
    generator = generator_of(
        make_column(type="llm_structured", prompt="A review of {{ thing }}", output_schema=SCHEMA),
        make_config(server_url),
    )
    value = await generator.agenerate({"thing": "a lamp"})
    assert set(value) == {"title", "stars"} and 1 <= value["stars"] <= 5
    assert generator.usage["requests"] == 1


async def test_malformed_structured_output_is_reasked_then_fails_for_good(server_url, generator_of):
    generator = generator_of(
        make_column(type="llm_structured", prompt="SPOIL {{ thing }}", output_schema=SCHEMA),
        make_config(server_url),
    )
    with pytest.raises(ModelOutputError, match="3 requests") as caught:
        await generator.agenerate({"thing": "a lamp"})
    assert not is_retryable(caught.value)
    assert generator.usage["requests"] == 3


async def test_llm_judge_returns_a_score_and_reasoning_per_criterion(server_url, generator_of, monkeypatch):
    sent = []
    complete = LlmClient.complete

    async def spy(self, endpoint, messages, **kw):  # what the model is asked
        sent.append(list(messages))
        return await complete(self, endpoint, messages, **kw)

    monkeypatch.setattr(LlmClient, "complete", spy)
    rubric = {"clarity": "Is the text clear?", "tone": "Is the tone friendly?"}
    generator = generator_of(
        make_column(type="llm_judge", prompt="Judge: {{ text }}", rubric=rubric), make_config(server_url)
    )
    value = await generator.agenerate({"text": "hello"})
    assert set(value) == set(rubric)
    for verdict in value.values():
        assert isinstance(verdict["score"], (int, float)) and isinstance(verdict["reasoning"], str)
    schema = judge_schema(rubric)
    assert schema["required"] == ["clarity", "tone"] and schema["additionalProperties"] is False
    prompt = sent[0][-1]["content"]
    assert prompt.startswith("Judge: hello")
    for criterion, description in rubric.items():
        assert criterion in prompt and description in prompt


def test_columns_on_one_model_share_one_limit_and_one_client(server_url):
    config = make_config(server_url)
    config.models["judge"] = SimpleNamespace(
        base_url=server_url, model="other", api_key_env=None, max_parallel_requests=2, timeout_s=5
    )
    runtime = LlmRuntime(config.models)
    first = make_llm_generator(make_column(name="a"), config, runtime=runtime)
    second = make_llm_generator(make_column(name="b"), config, runtime=runtime)
    third = make_llm_generator(make_column(name="c", model="judge"), config, runtime=runtime)
    assert first.limit is second.limit and first.limit is not third.limit
    assert (first.limit.max_limit, third.limit.max_limit) == (4, 2)
    assert runtime.client.max_connections == 6


def test_an_unknown_model_alias_is_a_config_error(server_url):
    with pytest.raises(ConfigError, match="nope"):
        config = make_config(server_url)
        make_llm_generator(make_column(model="nope"), config, runtime=LlmRuntime(config.models))


def test_the_sync_bridge_uses_its_own_connection(server_url):
    config = make_config(server_url)
    generator = make_llm_generator(make_column(), config, runtime=LlmRuntime(config.models))
    assert generator.generate({"word": "sync"}).endswith("Say sync")


async def test_the_engine_pattern_backs_off_during_a_burst_of_429s_and_recovers(generator_of):
    url, stop = fake.start_server(latency_ms=5, burst_429=["bursty:0:0.3"])
    try:
        config = make_config(url, model="bursty", max_parallel_requests=8)
        generator = generator_of(make_column(), config)
        limit = generator.limit
        outcomes, observed = [], []
        room = asyncio.Event()  # the engine's pattern: try_acquire, and on_available says when to try again
        limit.on_available = room.set

        async def acquire():
            while not limit.try_acquire():
                room.clear()
                await room.wait()

        async def task(i):
            while True:
                await acquire()
                try:
                    await generator.agenerate({"word": f"w{i}"})
                except ModelRateLimitError as exc:
                    limit.release(rate_limited=isinstance(exc, ModelRateLimitError))
                    observed.append(limit.limit)
                    outcomes.append(429)
                    await asyncio.sleep(0.02)
                    continue
                limit.release()
                outcomes.append(200)
                return

        await asyncio.gather(*(task(i) for i in range(40)))
        assert outcomes.count(200) == 40 and 429 in outcomes
        # Cut more than once, but not once per 429: the burst's first wave counts once.
        assert 2 <= limit.stats()["decreases"] < outcomes.count(429)
        assert min(observed) < 4
        for i in range(60):  # successes bring it back up
            await acquire()
            await generator.agenerate({"word": f"again{i}"})
            limit.release()
        assert limit.limit == 8
    finally:
        stop()


# --- prompts that render to nothing --------------------------------------------------------


def requests_of(url, model):
    import json
    import urllib.request

    with urllib.request.urlopen(url.removesuffix("/v1") + "/stats", timeout=10) as response:
        return json.loads(response.read())["models"].get(model, {}).get("requests", 0)


@pytest.mark.parametrize(("prompt", "system_prompt", "row", "field"), [
    ("{{ word }}", None, {"word": None}, "the prompt"),
    ("{{ word }}", None, {"word": "  \n "}, "the prompt"),
    ("{{ word }}", "You are terse.", {"word": ""}, "the prompt"),  # a system prompt does not stand in
    ("", "{{ word }}", {"word": None}, "the system_prompt"),  # prompt "": the system prompt is all there is
], ids=["none", "whitespace", "with a system prompt", "system prompt only"])
async def test_a_prompt_that_renders_empty_fails_without_a_request(server_url, generator_of, prompt, system_prompt, row,
                                                                   field):
    model = f"empty-{abs(hash((prompt, system_prompt, str(row))))}"
    generator = generator_of(make_column(prompt=prompt, system_prompt=system_prompt),
                                   make_config(server_url, model=model))
    with pytest.raises(GenerationError, match=f"'out': {field} rendered to empty text") as caught:
        await generator.agenerate(row)
    assert not is_retryable(caught.value)
    assert generator.usage["requests"] == 0 and requests_of(server_url, model) == 0


async def test_a_blank_prompt_leaves_the_system_prompt_as_the_whole_request(server_url, generator_of):
    generator = generator_of(make_column(prompt="", system_prompt="Name a {{ word }}."), make_config(server_url))
    assert await generator.agenerate({"word": "colour"})  # the fake server answers a request with no user turn
    assert generator.usage["requests"] == 1


# --- finish_reason and reasoning fields ----------------------------------------------------

REPLIES = {
    "cut": {"content": "half an ans", "finish_reason": "length"},
    "reasoning": {"content": "", "reasoning_content": "thinking hard"},
    "null-reasoning": {"content": None, "reasoning": "thinking"},
    "null": {"content": None, "finish_reason": "tool_calls"},
    "no-reason": {"body": {"choices": [{"message": {"content": "hi"}}]}},
    "odd-reason": {"body": {"choices": [{"message": {"content": "hi"}, "finish_reason": ["x"]}]}},
}


@pytest.fixture(scope="module")
def replies_url():
    url, stop = fake.start_server(replies=REPLIES)
    yield url
    stop()


@pytest.mark.parametrize(("name", "text", "finish_reason", "reasoning_chars"), [
    ("cut", "half an ans", "length", 0),
    ("reasoning", "", "stop", len("thinking hard")),
    ("null-reasoning", "", "stop", len("thinking")),
    ("no-reason", "hi", None, 0),
    ("odd-reason", "hi", None, 0),
])
async def test_a_completion_carries_its_finish_reason_and_reasoning(client, replies_url, name, text, finish_reason,
                                                                    reasoning_chars):
    completion = await client.complete(endpoint(replies_url), user(f"[[reply:{name}]]"))
    assert (completion.text, completion.finish_reason, completion.reasoning_chars) == (text, finish_reason,
                                                                                       reasoning_chars)


async def test_null_content_without_reasoning_is_still_refused(client, replies_url):
    with pytest.raises(ModelOutputError, match="no text.*tool_calls"):
        await client.complete(endpoint(replies_url), user("[[reply:null]]"))
