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
import difflib
import functools
import json
from typing import Any

import jinja2
from jinja2 import meta, nodes

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
    """The compiled template for ``text`` (cached). Raises ``jinja2.TemplateSyntaxError`` (also
    its subclass TemplateAssertionError: an unknown filter or test; :func:`syntax_problem`
    says what is wrong)."""
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
    """A one-line description of what keeps the template from compiling, or None when it
    compiles: a syntax error, a filter or test that does not exist, a tag that loads another
    template (there are no template files to load), or anything else Jinja2 refuses at compile
    time (a block defined twice, a template nested too deeply)."""
    try:
        tree = ENVIRONMENT.parse(text)
    except jinja2.TemplateSyntaxError as exc:
        return _describe(exc, text)
    except RecursionError:
        return _TOO_DEEP
    problem = _unknown_name(tree, text) or _loads_a_template(tree, text)
    if problem:
        return problem
    # Jinja2 checks more while compiling than while parsing (TemplateAssertionError); the
    # compiled template is cached for the generators.
    try:
        compile_template(text)
    except jinja2.TemplateSyntaxError as exc:
        return _describe(exc, text)
    except jinja2.TemplateError as exc:
        return f"Jinja2 error: {exc}; fix the template"
    except RecursionError:
        return _TOO_DEEP
    return None


_TOO_DEEP = "Jinja2 error: the template nests too deeply to read; simplify it, or compute the value in a python column"

_FILTERS_URL = "https://jinja.palletsprojects.com/en/stable/templates/#list-of-builtin-filters"
_TESTS_URL = "https://jinja.palletsprojects.com/en/stable/templates/#list-of-builtin-tests"


def _unknown_name(tree: nodes.Template, text: str) -> str | None:
    # Every filter and test, also those in a branch the compiler leaves to render time
    # ({% if %}), where an unknown one would fail every record that reaches it.
    for node in tree.find_all((nodes.Filter, nodes.Test)):
        kind, known, url = (
            ("filter", ENVIRONMENT.filters, _FILTERS_URL) if isinstance(node, nodes.Filter)
            else ("test", ENVIRONMENT.tests, _TESTS_URL)
        )
        if node.name in known:
            continue
        close = difflib.get_close_matches(node.name, list(known), n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        return _at(node.lineno, text, "Jinja2 error", f"no {kind} named {node.name!r}{hint}",
                   f"use one of Jinja2's {kind}s ({url}), or compute the value in a python column")
    return None


def _loads_a_template(tree: nodes.Template, text: str) -> str | None:
    for node in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        tag = {nodes.Extends: "extends", nodes.Include: "include", nodes.Import: "import"}.get(type(node), "from")
        return _at(node.lineno, text, "Jinja2 error", f"{{% {tag} %}} loads another template, and a config's "
                   "templates have no files to load", "write the text into this template")
    return None


def _at(lineno: int | None, text: str, kind: str, message: str, fix: str) -> str:
    lines = text.splitlines()
    where = f"line {lineno}" if lineno else "somewhere"
    shown = ""
    if lineno and 0 < lineno <= len(lines):
        shown = f" in {lines[lineno - 1].strip()!r}"
    return f"{kind} at {where}{shown}: {message}; {fix}"


def _describe(exc: jinja2.TemplateSyntaxError, text: str) -> str:
    message = (exc.message or "invalid syntax").rstrip(".")
    return _at(exc.lineno, text, "Jinja2 syntax error", message, "fix the template")


def template_config_error(
    exc: jinja2.TemplateError,
    text: str,
    *,
    path: object = None,
    column: str | None = None,
    field: str = "template",
) -> ConfigError:
    """A ConfigError naming the file, the column and the field whose template does not compile."""
    if isinstance(exc, jinja2.TemplateSyntaxError):
        problem = _describe(exc, text)
    else:
        problem = syntax_problem(text) or f"Jinja2 error: {exc}; fix the template"
    return ConfigError(f"{field}: {problem}", path=path, column=column)
