"""The model preflight (CONTRACT section 9): before a run is created, one cheap look at every
model endpoint the config uses, all at once.

Per model alias used by an ``llm_*`` column:

1. ``GET {base_url}/models`` with the key. No answer (connection refused, DNS, timeout) refuses
   the endpoint. A 200 that lists the model settles it: no tokens are spent.
2. Otherwise (the model is not listed, the route is missing, the key may not list models, or
   another answer): one chat completion naming the model with ``max_tokens: 1``. 401/403
   refuses the key; 404 refuses the model (no such model); no answer at all refuses the
   endpoint.

Any other answer (429, 5xx, another 4xx, a chat request that times out on a server that did
answer step 1) does not refuse the run: it becomes a warning, and the engine deals with what
follows (rate limits wait, outages pause). The whole check is bounded per endpoint by the
model's ``timeout_s``, at most :data:`MAX_CHECK_S`.

Requests carry the header ``X-Pipeline-Preflight: 1`` so that a server (the fake one in
``scripts/``, a proxy's logs) can tell them from the run's own calls. Messages name the alias and
the URL (without credentials or query), never the key: the client keeps it out of everything it
returns (see :mod:`pipeline.llm.client`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.errors import ModelCheckError, ModelConnectionError, ModelTimeoutError
from pipeline.llm.client import LlmClient, ModelEndpoint, ModelRequestError
from pipeline.surface import flag

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

__all__ = ["MAX_CHECK_S", "PREFLIGHT_HEADER", "ModelCheck", "check_models", "apreflight", "check_models_async", "preflight"]

log = logging.getLogger("pipeline.preflight")

#: Upper bound, in seconds, of the check of one endpoint (its two requests together).
MAX_CHECK_S = 10.0
PREFLIGHT_HEADER = {"X-Pipeline-Preflight": "1"}
_PING = [{"role": "user", "content": "ping"}]
_UNREACHABLE = (ModelConnectionError, ModelTimeoutError)


@dataclass(frozen=True)
class ModelCheck:
    """The outcome for one alias: ``refusal`` (the run must not start) or ``warning`` (it may),
    or neither (the endpoint answered and knows the model)."""

    alias: str
    where: str  # "model 'alias' at URL"
    refusal: str | None = None
    warning: str | None = None

    @property
    def ok(self) -> bool:
        return self.refusal is None


def _endpoints(config: PipelineConfig) -> list[ModelEndpoint]:
    return [ModelEndpoint.from_config(alias, config.models[alias]) for alias in config.used_models()
            if alias in config.models]


async def check_models_async(config: PipelineConfig) -> list[ModelCheck]:
    """Check every endpoint ``config`` uses, concurrently; one :class:`ModelCheck` per alias, in
    the order the columns first use them. Never raises for an endpoint's answer."""
    endpoints = _endpoints(config)
    if not endpoints:
        return []
    client = LlmClient(max_connections=len(endpoints))  # every check at once, none queued behind another
    try:
        return list(await asyncio.gather(*(_check(client, e) for e in endpoints)))
    finally:
        await client.aclose()


def check_models(config: PipelineConfig) -> list[ModelCheck]:
    """:func:`check_models_async` on a loop of its own (call it where no loop is running)."""
    if not config.used_models():
        return []
    return asyncio.run(check_models_async(config))


def preflight(config: PipelineConfig, command: str = "run") -> list[ModelCheck]:
    """Check the endpoints; log each warning (logger ``pipeline.preflight``) and raise
    :class:`~pipeline.errors.ModelCheckError` (exit 2) naming every refused alias and URL, ending
    in what ``command`` (``run``, ``preview`` or ``validate``) did not do and how it skips the check."""
    return _judged(check_models(config), command)


async def apreflight(config: PipelineConfig) -> list[ModelCheck]:
    """:func:`preflight` on the running event loop (``pipeline.arun``)."""
    return _judged(await check_models_async(config), "run")


#: What the end of a refusal says, by the command that checked: what was not done, and how that
#: command skips the check (`validate` checks only when asked: nothing to skip).
_AFTER_REFUSAL = {
    "run": lambda: "No run was created; fix the config or the server and try again "
                   f"({flag('`pipeline run --no-check-models`', 'check_models=False')} skips this check).",
    "preview": lambda: "Nothing was computed; fix the config or the server and try again "
                       f"({flag('`pipeline preview --no-check-models`', 'check_models=False')} skips this check).",
    "validate": lambda: "Fix the config or the server and check again.",
}


def _judged(checks: list[ModelCheck], command: str) -> list[ModelCheck]:
    for check in checks:
        if check.warning:
            log.warning("%s", check.warning)
    refused = [c.refusal for c in checks if c.refusal]
    if refused:
        head = refused[0] if len(refused) == 1 else (
            f"{len(refused)} model endpoints refused:\n  " + "\n  ".join(refused))
        raise ModelCheckError(f"{head}\n{_AFTER_REFUSAL[command]()}")
    return checks


async def _check(client: LlmClient, endpoint: ModelEndpoint) -> ModelCheck:
    bound = min(endpoint.timeout_s, MAX_CHECK_S)
    endpoint = dataclasses.replace(endpoint, timeout_s=bound)
    where = endpoint.where
    answered: list[bool] = []  # whether step 1 got any HTTP answer
    try:
        async with asyncio.timeout(bound):
            return await _probe(client, endpoint, answered)
    except TimeoutError:
        if answered:
            return ModelCheck(endpoint.alias, where, warning=(
                f"{where}: no answer to a one-token chat request within {bound:g} s; going on"))
        return ModelCheck(endpoint.alias, where, refusal=f"{where} cannot be reached: no answer within {bound:g} s")


async def _probe(client: LlmClient, endpoint: ModelEndpoint, answered: list[bool]) -> ModelCheck:
    alias, where = endpoint.alias, endpoint.where
    listed: list[str] | None = None
    outcome = await client.request(endpoint, "GET", "/models", headers=PREFLIGHT_HEADER)
    if isinstance(outcome, _UNREACHABLE):
        return ModelCheck(alias, where, refusal=_unreachable(outcome, where))
    answered.append(True)
    # A 401/403 here is not the last word: a key may be allowed to chat but not to list models
    # (OpenAI's restricted keys). The chat request below decides.
    if not isinstance(outcome, Exception):
        listed = _model_ids(outcome.body)
        if listed is not None and endpoint.model in listed:
            return ModelCheck(alias, where)

    payload = {"model": endpoint.model, "messages": _PING, "max_tokens": 1}
    outcome = await client.request(endpoint, "POST", "/chat/completions", payload, headers=PREFLIGHT_HEADER)
    if not isinstance(outcome, Exception):
        return ModelCheck(alias, where)
    if isinstance(outcome, ModelConnectionError):  # step 1 was answered: the server went away meanwhile
        return ModelCheck(alias, where, refusal=_unreachable(outcome, where))
    if _refuses_key(outcome):
        return ModelCheck(alias, where, refusal=_key_refused(endpoint, outcome.status_code))
    if isinstance(outcome, ModelRequestError) and outcome.status_code == 404:
        served = f" (it lists: {', '.join(listed[:10])}{', ...' if len(listed) > 10 else ''})" if listed else ""
        return ModelCheck(alias, where, refusal=(
            f"{where} has no model '{endpoint.model}': HTTP 404 to a chat request naming it{served}; "
            "fix 'model' under 'models:'"))
    if isinstance(outcome, ModelRequestError) and outcome.status_code is None:  # bad base_url, say
        return ModelCheck(alias, where, refusal=str(outcome))
    # 429, 5xx, another 4xx, a timeout: the engine waits, pauses or fails cells as they come.
    return ModelCheck(alias, where, warning=f"model check: {outcome}; going on")


def _refuses_key(outcome: Any) -> bool:
    return isinstance(outcome, ModelRequestError) and outcome.status_code in (401, 403)


def _key_refused(endpoint: ModelEndpoint, status: int) -> str:
    source = (f"the key in ${endpoint.api_key_env}" if endpoint.api_key_env
              else "a request without a key (set api_key_env under 'models:')")
    return f"{endpoint.where} refused {source}: HTTP {status}; check the key"


def _unreachable(error: Exception, where: str) -> str:
    detail = str(error).removeprefix(f"{where}: ")
    return f"{where} cannot be reached: {detail}; start the server or fix base_url"


def _model_ids(body: bytes) -> list[str] | None:
    """The ids of an OpenAI-style model list (``{"data": [{"id": ...}]}``), or None."""
    try:
        data = json.loads(body).get("data")
        return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
    except (ValueError, AttributeError, TypeError):
        return None
