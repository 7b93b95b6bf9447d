"""``python`` columns: a user function, or a user subclass of :class:`pipeline.Generator`.

``function: "module:callable"`` is imported by :func:`pipeline.sources.import_callable`. A plain
function is wrapped so that the engine sees the kind it is: a coroutine function only implements
``agenerate`` (awaited on the event loop, no thread hop), a plain one only ``generate`` (run in
the engine's thread pool).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Callable

from pipeline.generators.base import Generator
from pipeline.row_reads import explain_key_error
from pipeline.sources import import_callable, is_generator_class

if TYPE_CHECKING:
    from pipeline.config.models import PipelineConfig, PythonColumn

__all__ = ["AsyncFunctionGenerator", "FunctionGenerator", "make_python_generator"]


def _is_coroutine_function(func: Any) -> bool:
    if inspect.iscoroutinefunction(func):
        return True
    # A callable object whose __call__ is `async def` is awaited the same way.
    call = getattr(func, "__call__", None)
    return call is not None and not inspect.isfunction(func) and inspect.iscoroutinefunction(call)


class _Reads:
    """What a wrapped function may read, for the error when it reads another column
    (pipeline.row_reads): its column's name, its requires, the config's columns."""

    def _reads(self, column: str, declared: tuple[str, ...], known: frozenset[str]) -> None:
        self.column, self.declared, self.known = column, declared, known

    def _explained(self, exc: KeyError) -> BaseException:
        return explain_key_error(exc, self.column, self.declared, self.known) or exc


class FunctionGenerator(_Reads, Generator):
    """Wraps a plain function: ``f(row)`` in cell mode, ``f(df)`` in batch mode."""

    def __init__(self, func: Callable[[Any], Any], *, outputs: tuple[str, ...], strategy: str, stateful: bool):
        self.func = func
        self.outputs = outputs
        self.strategy = strategy
        self.is_stateful = stateful
        self._reads(getattr(func, "__name__", "?"), (), frozenset())

    def generate(self, data: Any) -> Any:
        try:
            return self.func(data)
        except KeyError as exc:
            explained = self._explained(exc)
            if explained is exc:
                raise
            raise explained from exc

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self.func, '__qualname__', self.func)!r}, {self.strategy})"


class AsyncFunctionGenerator(_Reads, Generator):
    """Wraps an ``async def`` function; it is awaited on the event loop, never in a thread."""

    def __init__(self, func: Callable[[Any], Any], *, outputs: tuple[str, ...], strategy: str, stateful: bool):
        self.func = func
        self.outputs = outputs
        self.strategy = strategy
        self.is_stateful = stateful
        self._reads(getattr(func, "__name__", "?"), (), frozenset())

    async def agenerate(self, data: Any) -> Any:
        try:
            return await self.func(data)
        except KeyError as exc:
            explained = self._explained(exc)
            if explained is exc:
                raise
            raise explained from exc

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self.func, '__qualname__', self.func)!r}, {self.strategy})"


def make_python_generator(column: PythonColumn, config: PipelineConfig) -> Generator:
    """The generator of a ``python`` column: the user's Generator subclass, created once, or a
    wrapper around the user's function. Mode and statefulness come from the validated column
    (config validation has already folded a Generator subclass's own ones into it)."""
    target = import_callable(column.function, config.base_dir)
    if is_generator_class(target):
        generator = target()
        generator.outputs = column.outputs
        # An instance attribute only where the config adds something: the class's own strategy
        # is what the config was validated against.
        if column.stateful and not target.is_stateful:
            generator.is_stateful = True
        return generator
    wrapper = AsyncFunctionGenerator if _is_coroutine_function(target) else FunctionGenerator
    generator = wrapper(target, outputs=column.outputs, strategy=column.mode, stateful=column.stateful)
    generator._reads(column.name, tuple(column.dependencies), frozenset(config.output_columns()))
    return generator
