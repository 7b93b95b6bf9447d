"""The one base class of every generator, built in or user-written.

A generator produces the values of one or more output columns. Implement ``generate`` (plain
function: the engine runs it in a bounded thread pool) or ``agenerate`` (coroutine: awaited on
the event loop, no thread hop); the other one is bridged.

What ``data`` is, and what to return, depends on ``strategy``:

- ``cell``: ``data`` is a dict of the record's values so far. Return the value of the single
  output column, or a dict ``{output column: value}`` when the generator has several outputs.
- ``batch``: ``data`` is a pandas DataFrame of the row group's live records, indexed by their
  global record index (0-based over the whole run). Return one value per row (list, Series,
  numpy array), or a DataFrame / dict of lists with one column per output.

A root ``batch`` generator (no inputs) receives a DataFrame with no columns and one row per live
record of the row group: the index tells which records to produce.
"""

from __future__ import annotations

import asyncio
from contextvars import ContextVar
from typing import Any, ClassVar

__all__ = ["Generator", "task_usage"]

#: Model usage of the task running in this context, ``[requests, prompt_tokens,
#: completion_tokens, finish_reason, truncated]``, or None: ``finish_reason`` of the last answer
#: (str or None), ``truncated`` 1 when a text answer cut by ``length`` was kept (else 0).
#: Generators that call models add to it; the engine sets it for
#: each task of a model-limited generator and records it with the task. Each asyncio task runs
#: in its own context, so concurrent tasks never mix their counts.
task_usage: ContextVar[list | None] = ContextVar("pipeline_task_usage", default=None)


class Generator:
    """Base class for generators. Subclass it and implement ``generate`` or ``agenerate``."""

    #: ``cell`` (one task per record) or ``batch`` (one task per row group).
    strategy: ClassVar[str] = "cell"
    #: A stateful generator runs one task at a time, row groups in order, retries included.
    is_stateful: ClassVar[bool] = False

    #: A batch generator that reads no column may set this: it is then given the global record
    #: indexes of its row group's live records (a numpy int64 array) instead of a DataFrame, so
    #: the engine need not load pandas before its first task (issue 12's cold start).
    reads_indexes: ClassVar[bool] = False

    #: The output columns, set by the engine when the generator is created from a config.
    outputs: tuple[str, ...] = ()

    def generate(self, data: Any) -> Any:
        """Produce values synchronously. Bridged to ``agenerate`` when only that is defined."""
        if type(self).agenerate is Generator.agenerate:
            raise NotImplementedError(f"{type(self).__name__} must implement generate() or agenerate()")
        return asyncio.run(self.agenerate(data))

    async def agenerate(self, data: Any) -> Any:
        """Produce values on the event loop. Bridged to ``generate`` (in a thread) when only that is defined."""
        if type(self).generate is Generator.generate:
            raise NotImplementedError(f"{type(self).__name__} must implement generate() or agenerate()")
        return await asyncio.get_running_loop().run_in_executor(None, self.generate, data)

    def state_dict(self) -> Any:
        """The state of a stateful generator (``is_stateful``) that its next values depend on: a
        counter, a seen-set, an RNG's state, as JSON-like values (what :mod:`pipeline.values`
        stores exactly). The engine records it with every task of the generator that finishes,
        in the same transaction, and on resume or takeover hands the latest one to
        :meth:`load_state_dict` before the generator's next task, so a killed run goes on from
        where it was. Not overridden: the generator's state restarts in a new process, and
        resume says so."""
        return None

    def load_state_dict(self, state: Any) -> None:
        """Take back what :meth:`state_dict` returned (see there)."""

    @property
    def keeps_state(self) -> bool:
        """True when the generator implements :meth:`state_dict`."""
        return type(self).state_dict is not Generator.state_dict

    @property
    def is_async(self) -> bool:
        """True when the generator is a coroutine function at heart (awaited with no thread hop)."""
        return type(self).agenerate is not Generator.agenerate
