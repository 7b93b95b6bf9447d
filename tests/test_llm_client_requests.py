"""The LLM client's requests that get an answer, over real HTTP against the fake server on
127.0.0.1: the text and token counts, max_tokens, the key sent from its env var, the shared
connection pool, proxies from the environment, chunked and compressed answers, and the
finish_reason and reasoning fields (a reply with neither text nor reasoning is refused).

How requests fail is in test_llm_client_errors.py; the llm_* generators in test_llm_generators.py."""

from __future__ import annotations

import asyncio
import socket

import pytest

from pipeline.errors import ModelConnectionError
from pipeline.llm import LlmClient, ModelOutputError, ModelRequestError

from tests.conftest import fake_server_module
from tests.llm_helpers import KEY_ENV, endpoint, user

fake = fake_server_module()


# --- the client ------------------------------------------------------------------------------


async def test_a_completion_returns_the_text_and_token_counts(client, server_url):
    completion = await client.complete(endpoint(server_url), user("one two three"), temperature=0.5, max_tokens=50)
    assert completion.text.startswith("echo: ") and completion.text.endswith("one two three")
    assert (completion.prompt_tokens, completion.completion_tokens) == (3, 5)


async def test_max_tokens_reaches_the_server(client, server_url):
    completion = await client.complete(endpoint(server_url), user("a b c d e f"), max_tokens=2)
    assert len(completion.text.split()) == 2


async def test_the_key_is_sent_from_the_env_var(client, keyed_url, secret_env):
    completion = await client.complete(endpoint(keyed_url, api_key_env=KEY_ENV), user("hi"))
    assert completion.text


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


# --- answers the fake server cannot give (the raw_server fixture, tests/conftest.py) ---------


@pytest.mark.parametrize("kind", ["chunked", "gzip"])
async def test_chunked_and_compressed_answers_are_read(client, raw_server, kind):
    completion = await client.complete(endpoint(raw_server), user(f"answer|{kind}"))
    assert completion.text == "hello there" and completion.prompt_tokens == 2


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
