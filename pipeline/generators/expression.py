"""``expression`` columns: a Jinja2 template rendered per record, then cast to its ``dtype``."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Callable

from pipeline.errors import GenerationError
from pipeline.generators.base import Generator
from pipeline.config.limits import DEFAULT_RENDER_TIMEOUT_S
from pipeline.templates import arender, compile_template, render

if TYPE_CHECKING:
    from pipeline.config import ExpressionColumn

__all__ = ["ExpressionGenerator", "cast_text"]


def _to_int(text: str) -> int:
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        # "3.0" is a fine integer once arithmetic in a template has made it a float.
        number = float(text)
        if not number.is_integer():
            raise
        return int(number)


_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})


def _to_bool(text: str) -> bool:
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false/1/0)")


_CASTS: dict[str, Callable[[str], Any]] = {
    "str": str,
    "int": _to_int,
    "float": lambda text: float(text.strip()),
    "bool": _to_bool,
    "json": json.loads,
}


def cast_text(text: str, dtype: str) -> Any:
    """The rendered ``text`` as a value of ``dtype`` (str, int, float, bool, json)."""
    return _CASTS[dtype](text)


class ExpressionGenerator(Generator):
    """Cell generator: ``generate(row)`` renders the template with the row's values.

    Every failure (an undefined name, a sandbox violation, a bound of :mod:`pipeline.sandbox`
    exceeded: steps, size, ``render_timeout_s``; a value that does not cast) raises
    :class:`GenerationError`, which is not retryable: the same record would fail the same way.
    """

    strategy = "cell"

    def __init__(self, column: ExpressionColumn, *, render_timeout_s: float = DEFAULT_RENDER_TIMEOUT_S):
        self.name = column.name
        self.outputs = column.outputs
        self.dtype = column.dtype
        self.template = compile_template(column.expr)
        self.render_timeout_s = render_timeout_s

    def generate(self, data: Any) -> Any:
        try:
            text = render(self.template, data, timeout_s=self.render_timeout_s)
        except Exception as exc:
            raise self._failed(exc) from exc
        return self._cast(text)

    async def agenerate(self, data: Any) -> Any:
        # Rendering takes microseconds: on the loop it costs less than a thread hop. A slow
        # template moves to a thread by itself (see pipeline.templates.arender).
        try:
            text = await arender(self.template, data, timeout_s=self.render_timeout_s)
        except Exception as exc:
            raise self._failed(exc) from exc
        return self._cast(text)

    def _failed(self, exc: Exception) -> GenerationError:
        return GenerationError(f"column '{self.name}': the expression failed: {exc}")

    def _cast(self, text: str) -> Any:
        try:
            return cast_text(text, self.dtype)
        except ValueError as exc:
            shown = text if len(text) <= 200 else text[:200] + "..."
            raise GenerationError(
                f"column '{self.name}': the expression gave {shown!r}, which is not a valid {self.dtype}"
            ) from exc

    def __repr__(self) -> str:
        return f"ExpressionGenerator({self.name!r}, {self.dtype})"
