"""The ``llm_text``, ``llm_structured`` and ``llm_judge`` generators: one chat completion per cell.

Each generator renders its Jinja2 prompts with the record's values, asks its model through the
config's shared :class:`~pipeline.llm.LlmRuntime`, and returns:

- ``llm_text``: the answer's text;
- ``llm_structured``: the parsed JSON object, valid against ``output_schema``;
- ``llm_judge``: ``{criterion: {"score": number, "reasoning": text}}`` for every rubric criterion.

Structured answers are requested with ``response_format`` (json_schema; ``strict`` only for a
schema OpenAI's strict mode accepts, see :func:`strict_compatible`, else the server would refuse
every request with 400), and read by :func:`pipeline.llm.answers.extract_json` (the whole text,
after a ``<think>`` block, a fenced block, or the first JSON value amid prose). An answer that is
empty (also one with only reasoning), or does not parse or validate, or a structured answer cut
by ``finish_reason == "length"``, is malformed: it is re-asked (quoting the problem when there
is text to quote) at most ``REASKS`` more times in the same task; then the cell fails for good
with :class:`~pipeline.llm.ModelOutputError` (the model has had its chances; a deferred retry
would most likely repeat them). An ``llm_text`` answer cut by ``length`` is kept, and counted
as truncated (the engine's per-task usage list, see :data:`~pipeline.generators.base.task_usage`).

A prompt that renders to empty or whitespace-only text fails its cell with GenerationError
before any request (with ``prompt: ""`` in the config, the system prompt is the one checked).

Concurrency is not limited here: the engine takes a permit from ``generator.limit`` (shared by
every column on the same model alias) before running a task and gives it back after, with
``rate_limited=isinstance(exc, ModelRateLimitError)``.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Mapping

from pipeline.errors import ConfigError, GenerationError
from pipeline.generators.base import Generator, task_usage
from pipeline.json_schemas import TOO_DEEP, schema_problem, schema_validator
from pipeline.llm import Completion, LlmClient, LlmRuntime, ModelOutputError
from pipeline.llm.answers import MalformedAnswer, extract_json, text_problem
from pipeline.redact import redact
from pipeline.config.limits import DEFAULT_RENDER_TIMEOUT_S
from pipeline.templates import TemplateLimitError, arender, compile_template, render
from pipeline.values import valid_unicode_deep

__all__ = ["LLM_COLUMN_TYPES", "LlmGenerator", "REASKS", "judge_schema", "make_llm_generator", "strict_compatible"]

LLM_COLUMN_TYPES = ("llm_text", "llm_structured", "llm_judge")

#: Extra requests after an answer that does not parse or validate.
REASKS = 2

# The bad answer quoted back in a re-ask is cut to this: enough to see the mistake, not a
# second copy of a runaway answer.
_QUOTED_ANSWER_CHARS = 4000

def judge_schema(rubric: Mapping[str, str]) -> dict[str, Any]:
    """The JSON Schema of a judge's answer: every criterion, each with a score and a reasoning."""
    verdict = {
        "type": "object",
        "properties": {"score": {"type": "number"}, "reasoning": {"type": "string"}},
        "required": ["score", "reasoning"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {criterion: verdict for criterion in rubric},
        "required": list(rubric),
        "additionalProperties": False,
    }


def strict_compatible(schema: Any) -> bool:
    """Whether OpenAI's strict structured outputs accept ``schema``: every object lists all its
    properties in ``required`` and sets ``additionalProperties: false`` (nested ones too)."""
    if isinstance(schema, list):
        return all(strict_compatible(part) for part in schema)
    if not isinstance(schema, dict):
        return True
    kind = schema.get("type")
    if kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in schema:
        properties = schema.get("properties") or {}
        if schema.get("additionalProperties") is not False or set(schema.get("required") or ()) != set(properties):
            return False
    nested = [*(schema.get("properties") or {}).values(), *(schema.get("$defs") or {}).values(),
              *(schema.get("definitions") or {}).values(), schema.get("items"), schema.get("anyOf")]
    return all(strict_compatible(part) for part in nested if part is not None)


def _judge_instructions(rubric: Mapping[str, str]) -> str:
    lines = [
        "",
        "",
        "Evaluate the above against each of these criteria:",
        *(f"- {criterion}: {description}" for criterion, description in rubric.items()),
        "",
        'For every criterion give a numeric "score" and a short "reasoning". Answer with only a '
        'JSON object of the form {"<criterion>": {"score": <number>, "reasoning": "<text>"}} '
        "whose keys are exactly: " + ", ".join(rubric) + ".",
    ]
    return "\n".join(lines)


class LlmGenerator(Generator):
    """One ``llm_*`` column. Create it with :func:`make_llm_generator`.

    Public attributes the engine reads: ``limit`` (the model alias's AdaptiveLimit) and
    ``usage``, running totals of this generator updated on the event loop thread:
    ``requests`` counts every request sent (re-asks and failures included), ``prompt_tokens``
    and ``completion_tokens`` what the server reported for the answered ones.
    """

    strategy = "cell"

    def __init__(self, column: Any, config: Any, *, runtime: LlmRuntime) -> None:
        if column.type not in LLM_COLUMN_TYPES:
            raise ConfigError(f"not an LLM column type: {column.type!r}", column=column.name)
        self.column_name: str = column.name
        self.column_type: str = column.type
        self.outputs = (column.name,)
        self.runtime = runtime
        if column.model not in self.runtime.endpoints:
            known = ", ".join(sorted(self.runtime.endpoints)) or "none"
            raise ConfigError(f"unknown model alias '{column.model}' (defined: {known})", column=column.name)
        self.model_alias: str = column.model
        self.endpoint = self.runtime.endpoint(column.model)
        self.limit = self.runtime.limit(column.model)
        self.usage: dict[str, int] = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        self.temperature = getattr(column, "temperature", None)
        self.max_tokens = getattr(column, "max_tokens", None)

        self._prompt = compile_template(column.prompt)
        self._prompt_text: str = column.prompt
        self._prompt_blank = not column.prompt.strip()  # prompt: "": the system prompt says it all
        settings = getattr(config, "settings", None)
        self.render_timeout_s = float(getattr(settings, "render_timeout_s", DEFAULT_RENDER_TIMEOUT_S))
        system_prompt = getattr(column, "system_prompt", None)
        self._system = compile_template(system_prompt) if system_prompt else None
        self._system_text: str | None = system_prompt
        self._suffix = ""
        self._schema: dict[str, Any] | None = None
        # The config checked output_schema against its metaschema and that the rubric is not
        # empty (pipeline.config); the judge schema is valid by construction.
        if column.type == "llm_structured":
            self._schema = dict(column.output_schema)
        elif column.type == "llm_judge":
            rubric = dict(column.rubric)
            self._schema = judge_schema(rubric)
            self._suffix = _judge_instructions(rubric)
        self._validator = None
        self._response_format = None
        if self._schema is not None:
            self._validator = schema_validator(self._schema)
            self._response_format = {
                "type": "json_schema",
                "json_schema": {"name": _schema_name(column.name), "schema": self._schema,
                                "strict": strict_compatible(self._schema)},
            }

    def __repr__(self) -> str:
        return f"LlmGenerator(column={self.column_name!r}, type={self.column_type!r}, model={self.model_alias!r})"

    def rendered_prompt(self, row: Mapping[str, Any]) -> str:
        """The text this column sends the model for ``row`` (``pipeline preview --show-prompts``):
        the system prompt when there is one and a blank line, then the user prompt (with a
        judge's instructions)."""
        user = render(self._prompt, row, timeout_s=self.render_timeout_s) + self._suffix
        if self._system is None:
            return user
        return render(self._system, row, timeout_s=self.render_timeout_s) + "\n\n" + user

    async def agenerate(self, row: dict) -> Any:
        """The value of this column for one record."""
        return await self._run(row, self.runtime.client)

    def generate(self, row: dict) -> Any:
        # Off the engine's loop there is no shared pool to use: a private one, closed at once.
        async def once() -> Any:
            client = LlmClient(max_connections=1)
            try:
                return await self._run(row, client)
            finally:
                await client.aclose()

        return asyncio.run(once())

    async def _run(self, row: Mapping[str, Any], client: LlmClient) -> Any:
        messages = await self._messages(row)
        if self._schema is None:
            return await self._ask_text(client, messages)
        return await self._ask_json(client, messages)

    async def _messages(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        """The request's messages; GenerationError (permanent) for a prompt that renders to
        empty or whitespace-only text: no request is sent for it."""
        system = None if self._system is None else await self._render(self._system, row, "system_prompt")
        prompt = await self._render(self._prompt, row, "prompt")
        messages = [] if system is None else [{"role": "system", "content": system}]
        if prompt and not prompt.isspace():
            messages.append({"role": "user", "content": prompt + self._suffix})
            return messages
        if self._prompt_blank and system and not system.isspace():
            # prompt: "" in the config: the system prompt is the whole request.
            if self._suffix:
                messages.append({"role": "user", "content": self._suffix.lstrip()})
            return messages
        field, template = "prompt", self._prompt_text
        if self._prompt_blank and self._system_text is not None:
            field, template = "system_prompt", self._system_text
        raise GenerationError(
            f"column '{self.column_name}': the {field} rendered to empty text (template "
            f"{_start(template or '', 120)!r}), so no request was sent; give the values it reads "
            "some text for this record, or fix the template"
        )

    async def _render(self, template: Any, row: Mapping[str, Any], field: str) -> str:
        # The same bounds as expression columns (pipeline.sandbox), naming the column. Whatever
        # the template raises for this record (an undefined name, a bound, a filter given a value
        # it cannot take) fails this cell only, naming the column and the field.
        try:
            return await arender(template, row, timeout_s=self.render_timeout_s)
        except TemplateLimitError as exc:
            raise GenerationError(f"column '{self.column_name}': {field}: {exc}") from exc
        except Exception as exc:
            raise GenerationError(
                f"column '{self.column_name}': {field}: the template failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def _ask(self, client: LlmClient, messages: list[dict[str, str]], **extra: Any) -> Completion:
        self.usage["requests"] += 1
        per_task = task_usage.get()
        if per_task is not None:
            per_task[0] += 1
        completion = await client.complete(
            self.endpoint, messages, temperature=self.temperature, max_tokens=self.max_tokens, **extra
        )
        self.usage["prompt_tokens"] += completion.prompt_tokens
        self.usage["completion_tokens"] += completion.completion_tokens
        if per_task is not None:
            per_task[1] += completion.prompt_tokens
            per_task[2] += completion.completion_tokens
            if len(per_task) > 3:  # the engine's list: the last answer's finish_reason is recorded
                per_task[3] = completion.finish_reason
        return completion

    async def _ask_text(self, client: LlmClient, messages: list[dict[str, str]]) -> str:
        problem = ""
        finish_reason = None
        for _ in range(1 + REASKS):
            completion = await self._ask(client, messages)
            finish_reason = completion.finish_reason
            problem = text_problem(completion.text, reasoning_chars=completion.reasoning_chars)
            if problem is None:
                if finish_reason == "length":  # kept, and counted as truncated
                    per_task = task_usage.get()
                    if per_task is not None and len(per_task) > 4:
                        per_task[4] = 1
                return completion.text
            # Nothing to quote back: the same request again (a sampled model may answer this time).
        raise ModelOutputError(
            f"column '{self.column_name}': {self.endpoint.where} gave no usable text in {1 + REASKS} "
            f"requests; last problem: {problem} (finish_reason={finish_reason!r})"
        )

    async def _ask_json(self, client: LlmClient, messages: list[dict[str, str]]) -> Any:
        conversation = messages
        last_problem = last_text = ""
        for _ in range(1 + REASKS):
            completion = await self._ask(client, conversation, response_format=self._response_format)
            text = completion.text
            try:
                return self._parse(completion)
            except MalformedAnswer as problem:
                last_problem, last_text = str(problem), text
            if not text or text.isspace():
                conversation = messages  # nothing to quote back: the same request again
                continue
            # Only the latest mistake is quoted back: the conversation stays short.
            conversation = [
                *messages,
                {"role": "assistant", "content": text[:_QUOTED_ANSWER_CHARS]},
                {
                    "role": "user",
                    "content": f"That answer is not usable: {last_problem}. Answer again with only a "
                    "JSON object that satisfies the requested JSON Schema, with no other text.",
                },
            ]
        raise ModelOutputError(
            f"column '{self.column_name}': {self.endpoint.where} gave no usable JSON in "
            f"{1 + REASKS} requests; last problem: {redact(last_problem)}; last answer starts {_start(last_text)!r}"
        )

    def _parse(self, completion: Completion) -> Any:
        if completion.finish_reason == "length":
            raise MalformedAnswer("it was cut off at the token limit (finish_reason 'length'); give a shorter answer")
        problem = text_problem(completion.text, reasoning_chars=completion.reasoning_chars)
        if problem is not None:
            raise MalformedAnswer(problem)
        # json.loads turns a "\ud83d" escape into a lone surrogate, which no store can hold.
        value = extract_json(completion.text, self._check)
        try:
            return valid_unicode_deep(value)
        except RecursionError:  # read and valid, but too deep to walk (some hundreds of levels)
            raise MalformedAnswer(TOO_DEEP) from None

    def _check(self, value: Any) -> str | None:
        """None when ``value`` is valid against the column's schema, else the problem."""
        problem = schema_problem(self._validator, value)
        return None if problem is None else _start(problem, 400)


def _start(text: str, chars: int = 200) -> str:
    """The start of an answer for a message: redacted BEFORE it is cut, since a secret cut in
    two is no longer recognised (a server may echo the Authorization header into its answer)."""
    return redact(text[:chars + 4096])[:chars]


def _schema_name(column_name: str) -> str:
    # OpenAI accepts [a-zA-Z0-9_-]{1,64} here; column names may hold dots.
    return re.sub(r"[^A-Za-z0-9_-]", "_", column_name)[:64] or "output"


def make_llm_generator(column: Any, config: Any, *, runtime: LlmRuntime) -> LlmGenerator:
    """The generator of an ``llm_text`` / ``llm_structured`` / ``llm_judge`` column.

    ``runtime`` holds the HTTP pool and the per-alias limits, shared by every LLM column of the
    config (:func:`pipeline.generators.llm_runtime` makes it; its owner closes it); ConfigError
    when ``column.model`` is not one of its aliases. ``config`` gives the render timeout
    (``settings.render_timeout_s``).
    """
    return LlmGenerator(column, config, runtime=runtime)
