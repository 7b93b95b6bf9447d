"""Money spent on models and the run's projected total, for ``pipeline status`` and the end
summary (CONTRACT section 10). Prices are per model, per million tokens, in whatever currency
they are written in (``price_per_million_input_tokens`` / ``price_per_million_output_tokens``);
the engine adds each task's cost to ``model_usage.cost`` as it records the task's usage.

The projection of a model: its cost so far times the cells its columns have to compute
(``num_records`` per column) over the cells they finished (done or failed). A complete run's
projection is what it spent.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.states import RunStatus

__all__ = ["add_costs", "money"]


def money(amount: float | None) -> str:
    """Money in the prices' currency (no symbol: prices may be in any): 4 decimals, since cents
    of a cent matter per record; ``-`` when there are no prices."""
    return "-" if amount is None else f"{amount:,.4f}"


def add_costs(status: dict[str, Any], config_json: str | None) -> None:
    """Add ``projected_cost`` to each model of ``status["models"]`` and ``status["cost"]`` =
    ``{"spent", "projected"}`` (None when no model has prices). ``projected`` is None until each
    priced model has finished a cell."""
    models = status.get("models") or {}
    columns: list = []
    if config_json:
        try:
            columns = json.loads(config_json).get("columns") or []
        except (ValueError, AttributeError):
            pass
    counts = status.get("columns") or {}
    spent, projected = 0.0, 0.0
    priced = False
    for alias, usage in models.items():
        cost = usage.get("cost")
        usage["projected_cost"] = None
        if cost is None:
            continue
        priced = True
        spent += cost
        users = [c.get("name") for c in columns if isinstance(c, dict) and c.get("model") == alias
                 and str(c.get("type", "")).startswith("llm_")]
        finished = sum(counts[u]["done"] + counts[u]["failed"] for u in users if u in counts)
        if status.get("status") == RunStatus.COMPLETE:
            usage["projected_cost"] = cost
        elif finished:
            usage["projected_cost"] = cost * len(users) * status["num_records"] / finished
        if projected is not None and usage["projected_cost"] is not None:
            projected += usage["projected_cost"]
        else:
            projected = None
    status["cost"] = {"spent": spent, "projected": projected} if priced else None
