"""Plain helpers of the LLM client and generator tests (tests/test_llm_client_*.py,
tests/test_llm_generators.py): the test key and its variable, an endpoint, a user turn, a
config and a column as the generators read them, and the raw answers of the raw_server fixture
(tests/conftest.py), which the fake server cannot give."""

from __future__ import annotations

import pathlib
from types import SimpleNamespace

from pipeline.llm import ModelEndpoint

SECRET = "sk-test-5ecret-do-not-leak-0123456789"
KEY_ENV = "PIPELINE_TEST_LLM_KEY"


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
