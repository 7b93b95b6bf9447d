"""Failures told once, not a flood (CONTRACT section 9 "One summary, not a flood").

The scheduler reports every task that fails for good to :class:`FailureLog`. Per kind, a pair
(generator, error class), the first ``FULL`` failures are logged in full (column, row group,
record, attempts, message); the next one logs that further failures of that kind are counted
and shown in the summary at the end; then nothing more. The counts and one example per kind
are kept for the end of the run; the summary itself is read from the store, so that it covers
every worker (``Store.failures``). :func:`describe` is the one text of an error that is recorded.
"""

from __future__ import annotations

import logging
from typing import Any

from pipeline.redact import redact

__all__ = ["FailureLog", "describe", "error_class"]


def describe(exc: BaseException) -> str:
    """An error as the store records it (``tasks.last_error``) and a model's health reports it:
    ``"ValueError: message"``, secrets redacted, at most 1,000 characters."""
    text = redact(f"{type(exc).__name__}: {exc}")  # before the cut: a cut key is not recognised
    return text if len(text) <= 1000 else text[:997] + "..."


def error_class(message: str | None) -> str:
    """The error's class name from a stored ``last_error`` (``"ValueError: ..."``)."""
    if not message:
        return "Error"
    head = message.split(":", 1)[0].strip()
    return head if head.isidentifier() else "Error"


class FailureLog:
    """Logs failures a few times per kind, then counts them."""

    FULL = 3

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.counts: dict[tuple[str, str], int] = {}

    def failed(self, generator: str, rg: int, r: int | None, task_type: str, attempts: int,
               exc: BaseException) -> None:
        kind = (generator, type(exc).__name__)
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n <= self.FULL:
            where = f"row {r}" if r is not None else f"the whole row group ({task_type} task)"
            self.log.warning("%s[rg=%d%s] failed for good after %d attempt(s), dropping %s: %s: %s",
                             generator, rg, "" if r is None else f", row={r}", attempts, where,
                             type(exc).__name__, _short(exc))
        elif n == self.FULL + 1:
            self.log.warning("%s: more %s failures are counted, not shown; the summary at the end "
                             "groups them", generator, type(exc).__name__)


def _short(exc: Any) -> str:
    text = str(exc)
    return text if len(text) <= 500 else text[:497] + "..."
