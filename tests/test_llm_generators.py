"""The llm_text, llm_structured and llm_judge generators on the LLM client, against the fake
server on 127.0.0.1: prompts and usage, validated and re-asked structured output, the judge's
verdicts, one limit and one client per model, the engine's back-off through a burst of 429s,
and prompts that render to nothing (refused without a request)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from pipeline.errors import ConfigError, GenerationError, ModelRateLimitError, is_retryable
from pipeline.generators.llm import judge_schema, make_llm_generator
from pipeline.llm import LlmClient, LlmRuntime, ModelOutputError

from tests.conftest import fake_server_module
from tests.llm_helpers import make_column, make_config

fake = fake_server_module()


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


@pytest.mark.parametrize(("text", "words"), [
    # valid JSON for the schema and read by the parser, but too deep to walk when kept
    ("[" * 700 + "]" * 700, "nested too deeply to keep"),
    ('{"x": NaN}', "NaN"),  # Python's json reads these; JSON has none, and no store keeps them
    ('{"x": 1e400}', "too large"),
], ids=["700 levels", "NaN", "1e400"])
async def test_an_answer_too_deep_to_keep_or_with_a_non_json_number_is_malformed(server_url, generator_of, text, words):
    from pipeline.llm.answers import MalformedAnswer
    from pipeline.llm.responses import Completion

    generator = generator_of(make_column(type="llm_structured", prompt="Facts.", output_schema={}),
                             make_config(server_url))
    with pytest.raises(MalformedAnswer, match=words):  # asked again, as any malformed answer
        generator._parse(Completion(text, 1, 1))
