"""The one Jinja2 environment of `pipeline`.

Config validation, the ``expression`` generator and the ``llm_*`` generators all go through this
module, so a template means the same thing everywhere: sandboxed (a config file is not trusted
code) and bounded in steps, time and size (:mod:`pipeline.sandbox`), strict about undefined
names (a typo must fail the cell, not render an empty string), no HTML autoescaping (the output
is data and prompts, not web pages), a missing value (None, NaN, pandas NA) printed as the
empty string.

Generators render with :func:`render` (in a worker thread) or :func:`arender` (on the event
loop): both bound the render by ``settings.render_timeout_s``; ``arender`` moves a render that
takes more than a few milliseconds off the loop.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
from typing import Any

import jinja2
from jinja2 import meta

from pipeline.errors import ConfigError
from pipeline.loaded import loaded
from pipeline.sandbox import BoundedEnvironment, Budget, SliceSpent, TemplateLimitError
from pipeline.values import to_python

__all__ = [
    "ENVIRONMENT",
    "TemplateLimitError",
    "arender",
    "compile_template",
    "referenced_names",
    "render",
    "syntax_problem",
    "template_config_error",
]

# A render on the event loop that takes longer than this starts over in a worker thread. Renders
# take microseconds; a thread hop costs ~50 us, so only slow templates pay it.
_ON_LOOP_SLICE_S = 0.005


def _json_default(value: Any) -> Any:
    plain = to_python(value)
    if plain is not value:
        return plain
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    # A prompt is better served by some text than by a failed cell.
    return str(value)


def _tojson(value: Any, indent: int | None = None) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML; prompts and data want the plain JSON.
    if isinstance(indent, int) and indent > 64:
        raise TemplateLimitError(f"tojson(indent={indent}) is too wide; the limit is 64")
    return json.dumps(value, ensure_ascii=False, indent=indent, default=_json_default)


_MISSING_TYPES = frozenset({"NAType", "NaTType"})  # pandas' NA and NaT, named: no pandas import here


def _missing_as_empty(value: Any) -> Any:
    """Jinja2's ``finalize``: a missing value (None, NaN, pandas NA/NaT) prints as ``""`` in
    every ``{{ ... }}``, never ``None`` or ``nan`` (contract section 10). Text passes first."""
    cls = value.__class__
    if cls is str:
        return value
    if value is None:
        return ""
    if isinstance(value, float):  # numpy's float64 too
        return "" if value != value else value
    if cls.__name__ in _MISSING_TYPES:
        return ""
    # A numpy value exists only once numpy is loaded: ask pipeline.loaded rather than
    # importing it, which config validation (a template's syntax) would pay.
    np = loaded("numpy")
    if np is not None and isinstance(value, np.floating) and np.isnan(value):
        return ""
    return value


def _make_environment() -> BoundedEnvironment:
    env = BoundedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        finalize=_missing_as_empty,
    )
    env.filters["tojson"] = _tojson
    return env


#: Shared by every template. Rendering is thread-safe; nobody mutates it after import.
ENVIRONMENT = _make_environment()

# Names the environment itself provides (range, dict, lipsum, ...): a template that uses them
# does not read a column of that name.
_GLOBALS = frozenset(ENVIRONMENT.globals)


@functools.lru_cache(maxsize=4096)
def compile_template(text: str) -> jinja2.Template:
    """The compiled template for ``text`` (cached). Raises ``jinja2.TemplateSyntaxError``."""
    return ENVIRONMENT.from_string(text)


@functools.lru_cache(maxsize=4096)
def _referenced(text: str) -> frozenset[str]:
    return frozenset(meta.find_undeclared_variables(ENVIRONMENT.parse(text))) - _GLOBALS


def render(template: jinja2.Template, data: Any, *, timeout_s: float) -> str:
    """``template`` rendered with ``data`` (a mapping) in this thread, within the bounds of
    :mod:`pipeline.sandbox` and ``timeout_s`` seconds. Raises TemplateLimitError past a bound,
    or what the template raised (UndefinedError, SecurityError, ...)."""
    return template.render_within(data, Budget(timeout_s))


async def arender(template: jinja2.Template, data: Any, *, timeout_s: float) -> str:
    """As :func:`render`, from the event loop, which it never holds for long: a render that
    outlasts a few milliseconds starts over in a worker thread (rendering is a pure function
    of ``data``, so the second start gives what the first would have). A cancelled caller
    stops the thread's render at its next step."""
    try:
        return template.render_within(data, Budget(timeout_s, slice_s=min(_ON_LOOP_SLICE_S, timeout_s)))
    except SliceSpent:
        pass
    budget = Budget(timeout_s)
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(None, template.render_within, data, budget)
    except asyncio.CancelledError:
        budget.cancelled = True
        raise


def referenced_names(text: str) -> set[str]:
    """The variables ``text`` reads from its context: the columns a template depends on.

    Names set inside the template (``{% set %}``, loop variables) and the environment's globals
    are left out. Raises ``jinja2.TemplateSyntaxError``.
    """
    return set(_referenced(text))


def syntax_problem(text: str) -> str | None:
    """A one-line description of the template's syntax error, or None when it parses."""
    try:
        ENVIRONMENT.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return _describe(exc, text)
    return None


def _describe(exc: jinja2.TemplateSyntaxError, text: str) -> str:
    lines = text.splitlines()
    where = f"line {exc.lineno}" if exc.lineno else "somewhere"
    shown = ""
    if exc.lineno and 0 < exc.lineno <= len(lines):
        shown = f" in {lines[exc.lineno - 1].strip()!r}"
    message = (exc.message or "invalid syntax").rstrip(".")
    return f"Jinja2 syntax error at {where}{shown}: {message}; fix the template"


def template_config_error(
    exc: jinja2.TemplateSyntaxError,
    text: str,
    *,
    path: object = None,
    column: str | None = None,
    field: str = "template",
) -> ConfigError:
    """A ConfigError naming the file, the column and the field whose template does not parse."""
    return ConfigError(f"{field}: {_describe(exc, text)}", path=path, column=column)
