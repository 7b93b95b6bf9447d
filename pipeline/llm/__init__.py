"""The LLM layer: an OpenAI-compatible client, its error mapping, and per-model AIMD limits.

An :class:`LlmRuntime` holds what must be shared by every ``llm_*`` column of a config: one
pooled HTTP client, and one :class:`AdaptiveLimit` (with its :class:`~pipeline.llm.pacing.Pacer`)
per model alias (two columns on the same model compete for the same server capacity, so they
must see the same 429s and share one limit).

Its owner is explicit: the engine's job (:class:`pipeline.api.jobs.Job`) makes one per run
(:func:`pipeline.generators.llm_runtime`), hands it to the generators as they are built, and
closes its pool (``await runtime.aclose()``) on the event loop that used it.
"""

from __future__ import annotations

from typing import Any, Mapping

from pipeline.errors import ModelRateLimitError, is_outage
from pipeline.llm.client import (
    Completion,
    LlmClient,
    ModelEndpoint,
    ModelOutputError,
    ModelRequestError,
    parse_retry_after,
)
from pipeline.llm.health import ANSWERED, OUTAGE, RATE_LIMITED, ModelHealth
from pipeline.llm.pacing import Pacer
from pipeline.llm.throttle import AdaptiveLimit
from pipeline.redact import register_env

__all__ = [
    "AdaptiveLimit",
    "Completion",
    "LlmClient",
    "LlmRuntime",
    "ModelHealth",
    "ModelEndpoint",
    "ModelOutputError",
    "ModelRequestError",
    "Pacer",
    "parse_retry_after",
]


PROBE_HEADER = {"X-Pipeline-Probe": "1"}


class LlmRuntime:
    """The shared client and the per-alias limits of one config's ``models``."""

    def __init__(self, models: Mapping[str, Any] | None) -> None:
        self.endpoints: dict[str, ModelEndpoint] = {
            alias: ModelEndpoint.from_config(alias, model) for alias, model in (models or {}).items()
        }
        for endpoint in self.endpoints.values():  # their keys are blanked out of every message
            register_env(endpoint.api_key_env)
            for _, value in endpoint.extra_headers:
                if type(value) is tuple:
                    register_env(value[1])
        self.limits: dict[str, AdaptiveLimit] = {
            alias: AdaptiveLimit(max(1, endpoint.max_parallel_requests)) for alias, endpoint in self.endpoints.items()
        }
        for alias, model in (models or {}).items():
            limit = self.limits[alias]
            limit.pacer = Pacer(requests_per_minute=getattr(model, "max_requests_per_minute", None),
                                tokens_per_minute=getattr(model, "max_tokens_per_minute", None),
                                prices=getattr(model, "prices", None))
        # Every permit can hold a connection; more would only sit idle.
        pool = sum(limit.max_limit for limit in self.limits.values())
        self.client = LlmClient(max_connections=max(1, pool))
        self.client.observers.update({alias: limit.observe for alias, limit in self.limits.items()})
        for alias, limit in self.limits.items():
            endpoint = self.endpoints[alias]
            limit.attach_health(ModelHealth(endpoint.where, probe=lambda e=endpoint: self.probe(e)))

    async def probe(self, endpoint: ModelEndpoint) -> str:
        """One cheap request (a one-token chat completion naming the model, with the header
        ``X-Pipeline-Probe: 1`` so a server can tell it from the run's calls): ``ANSWERED``
        when the endpoint answers anything but 429 or an outage, else ``RATE_LIMITED`` /
        ``OUTAGE``. Not counted in ``model_usage``."""
        payload = {"model": endpoint.model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        outcome = await self.client.request(endpoint, "POST", "/chat/completions", payload, headers=PROBE_HEADER)
        if isinstance(outcome, ModelRateLimitError):
            return RATE_LIMITED
        if isinstance(outcome, Exception) and is_outage(outcome):
            return OUTAGE
        return ANSWERED  # an answer, or a 4xx: it answers

    def __repr__(self) -> str:
        return f"LlmRuntime(models={sorted(self.endpoints)})"

    def endpoint(self, alias: str) -> ModelEndpoint:
        return self.endpoints[alias]

    def limit(self, alias: str) -> AdaptiveLimit:
        return self.limits[alias]

    def stats(self) -> dict[str, dict[str, int]]:
        """``{alias: AdaptiveLimit.stats()}``."""
        return {alias: limit.stats() for alias, limit in self.limits.items()}

    async def aclose(self) -> None:
        """Stop probing and close the HTTP pool (the runtime stays usable; limits keep what
        they learned)."""
        for limit in self.limits.values():
            if limit.health is not None:
                limit.health.close()
        await self.client.aclose()
