"""The one Jinja2 environment of `pipeline`.

Config validation, the ``expression`` generator and the ``llm_*`` generators all go through this
module, so a template means the same thing everywhere: sandboxed (a config file is not trusted
code), strict about undefined names (a typo must fail the cell, not render an empty string), no
HTML autoescaping (the output is data and prompts, not web pages).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.errors import ConfigError
from pipeline.values import to_python

__all__ = [
    "ENVIRONMENT",
    "compile_template",
    "referenced_names",
    "syntax_problem",
    "template_config_error",
]


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
    return json.dumps(value, ensure_ascii=False, indent=indent, default=_json_default)


def _make_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
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
