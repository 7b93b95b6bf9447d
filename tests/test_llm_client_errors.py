"""How the LLM client's requests fail, over real HTTP against the fake server on 127.0.0.1:
each HTTP status, Retry-After, a timeout, a closed port, a wrong or unset key, a redirect, a
bad base_url and a broken answer map to one typed error, retryable or not, that names the
endpoint without credentials; and no error, repr or traceback shows the API key."""

from __future__ import annotations

import email.utils
import pickle
import socket
import time
import traceback

import pytest

from pipeline.errors import (
    ModelConnectionError,
    ModelRateLimitError,
    ModelServerError,
    ModelTimeoutError,
    is_retryable,
)
from pipeline.llm import ModelRequestError, parse_retry_after

from tests.llm_helpers import KEY_ENV, SECRET, endpoint, make_column, make_config, user


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


async def test_a_wrong_key_is_a_401_that_fails_for_good(client, keyed_url, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong")
    with pytest.raises(ModelRequestError) as caught:
        await client.complete(endpoint(keyed_url, api_key_env=KEY_ENV), user("hi"))
    assert caught.value.status_code == 401


async def test_an_unset_key_variable_fails_for_good_and_names_it(client, keyed_url, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ModelRequestError, match=KEY_ENV):
        await client.complete(endpoint(keyed_url, api_key_env=KEY_ENV), user("hi"))


async def test_a_key_variable_set_to_nothing_is_said_to_be_empty_not_unset(client, keyed_url, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "")
    with pytest.raises(ModelRequestError, match=f"{KEY_ENV} .*is set but empty"):
        await client.complete(endpoint(keyed_url, api_key_env=KEY_ENV), user("hi"))


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
