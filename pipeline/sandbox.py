"""Bounds on user templates: a template that loops for ever or builds a huge value fails its
own cell, it never hangs the process or exhausts its memory (issue 14, items 8 and 12).

Jinja2's sandbox stops templates from reaching Python internals, and bounds ``range()`` to
100,000 items; it does nothing against a template that runs long or allocates much, and its
maintainers advise limits from outside the process (pallets/jinja#1691, #2149). A process-wide
limit would also stop every other cell of the run, so the bounds live here, in the sandbox, per
render, and a template that exceeds one raises :class:`TemplateLimitError` (not retryable: the
same record would exceed it again):

- steps: every loop iteration, every call (functions, methods, filters) and every intercepted
  operator counts one, a macro call :data:`MACRO_STEPS`; at most :data:`MAX_STEPS` per render.
  ``{% for i in range(100000) %}{% for j in range(100000) %}`` stops after 1,000,000 steps.
- time: a render ends after ``timeout_s`` (``settings.render_timeout_s``), checked every few
  steps: the backstop for steps that are each slow.
- sizes: ``*``, ``+``, ``%``, ``~``, ``**`` and the filters and ``str`` methods that grow a value
  (``center``, ``indent``, ``join``, ``replace``, ``format``, ``wordwrap``, ``batch``, ``slice``,
  ``ljust``, ``zfill``, ``expandtabs``, ``lipsum``, ...) check the size of their result BEFORE
  making it: at most :data:`MAX_SIZE` characters (or items) per value, integers of at most
  :data:`MAX_INT_BITS` bits; ``sum`` only adds numbers (adding lists or strings is quadratic).
- output: what a render outputs, in total and into ``{% set %}`` blocks and macros, counts
  against :data:`MAX_OUTPUT` characters.

:func:`pipeline.templates.arender` renders on the event loop while that takes less than a few
milliseconds and starts over in a worker thread otherwise, so the loop stays free (signals,
lease renewals) while a slow template uses its time.

This module is the environment that applies the bounds (:class:`BoundedEnvironment`, whose
templates render within a :class:`Budget`); the limits, the budget and the size checks are in
:mod:`pipeline.sandbox_limits` (the limits, :class:`Budget`, :class:`SliceSpent` and
:class:`TemplateLimitError` are importable from here too).

What is not bounded: the cost of one call into C on values a record already holds (sorting a
list of a million items). Such values come from the data, not from the template.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.sandbox_limits import (
    CURRENT,
    FILTER_CHECKS,
    MACRO_STEPS,
    MAX_INT_BITS,
    MAX_OUTPUT,
    MAX_SIZE,
    MAX_STEPS,
    RUNTIME,
    STR_METHOD_CHECKS,
    Budget,
    SliceSpent,
    TemplateLimitError,
    bounded_concat,
    check_add,
    check_format,
    check_join,
    check_mul,
    check_pow,
    check_printf,
    guard_filter,
    lipsum,
    tick,
)

__all__ = [
    "MACRO_STEPS",
    "MAX_INT_BITS",
    "MAX_OUTPUT",
    "MAX_SIZE",
    "MAX_STEPS",
    "Budget",
    "BoundedEnvironment",
    "SliceSpent",
    "TemplateLimitError",
]


# -- the environment ------------------------------------------------------------------------------


class _CodeGenerator(CodeGenerator):
    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        # The iterable becomes environment.counted(<iterable>), which counts every item against
        # the render's budget. (Jinja allows no custom node types: a Call node does it.)
        original = node.iter
        counted = nodes.EnvironmentAttribute("counted", lineno=original.lineno)
        node.iter = nodes.Call(counted, [original], [], None, None, lineno=original.lineno)
        node.iter.set_environment(self.environment)
        try:
            super().visit_For(node, frame)
        finally:
            node.iter = original


def _counting(iterable: Any, budget: Budget) -> Any:
    tick = budget.tick
    for item in iterable:
        tick()
        yield item


class BoundedTemplate(jinja2.Template):
    """A template whose :meth:`render` runs within a :class:`Budget`."""

    @classmethod
    def from_code(cls, environment: Any, code: Any, globals: Any, uptodate: Any = None) -> Any:
        template = super().from_code(environment, code, globals, uptodate)
        template.root_render_func.__globals__.update(RUNTIME)  # the module of this template
        return template

    def render(self, *args: Any, **kwargs: Any) -> str:
        """Render within a fresh budget of the environment's default time limit."""
        return self.render_within(dict(*args, **kwargs), Budget(self.environment.timeout_s))

    def render_within(self, data: Any, budget: Budget) -> str:
        """Render ``data`` spending ``budget``; raises TemplateLimitError (or SliceSpent)."""
        token = CURRENT.set(budget)
        budget.start()
        try:
            context = self.new_context(dict(data))
            try:
                return bounded_concat(self.root_render_func(context))
            except (TemplateLimitError, SliceSpent):
                raise
            except Exception:
                self.environment.handle_exception()
        finally:
            CURRENT.reset(token)


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, with the bounds of this module."""

    code_generator_class = _CodeGenerator
    template_class = BoundedTemplate
    intercepted_binops = frozenset({"*", "**", "+", "%"})
    concat = staticmethod(bounded_concat)  # joins {% set %} blocks, macros and call blocks

    def __init__(self, *args: Any, timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: the time limit of :meth:`BoundedTemplate.render`
        self.timeout_s = timeout_s
        for name, check in FILTER_CHECKS.items():
            self.filters[name] = guard_filter(name, self.filters[name], check)
        self.globals["lipsum"] = lipsum
        given = self.finalize  # a finalize passed in runs first; its output is counted
        self.finalize = self._count_output if given is None else lambda value: self._count_output(given(value))

    def _count_output(self, value: Any) -> Any:
        """Every ``{{ ... }}`` output counts against the render's output budget."""
        budget = CURRENT.get()
        if budget is None:
            return value
        text = value if value.__class__ is str else str(value)
        budget.output -= len(text)
        if budget.output < 0:
            budget.spend_output(0)  # raises, saying why
        return text

    def counted(self, iterable: Any) -> Any:
        budget = CURRENT.get()
        return iterable if budget is None else _counting(iterable, budget)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        tick()
        if operator == "*":
            check_mul(left, right)
        elif operator == "+":
            check_add(left, right)
        elif operator == "**":
            check_pow(left, right)
        elif operator == "%" and isinstance(left, str):
            check_printf(left, right)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = CURRENT.get()
        if budget is not None:
            if isinstance(__obj, Macro):  # a call renders the macro's body: it weighs more
                budget.steps -= MACRO_STEPS - 1
            budget.tick()
        if isinstance(__obj, types.BuiltinMethodType) and isinstance(__obj.__self__, str):
            check = STR_METHOD_CHECKS.get(__obj.__name__)
            if check is not None:
                check(__obj.__self__, *args)
            elif __obj.__name__ == "join" and args:
                items = list(args[0])
                check_join(items, __obj.__self__)
                args = (items, *args[1:])
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        @functools.wraps(wrapped)
        def bounded(*args: Any, **kwargs: Any) -> str:
            if is_map:
                check_format(fmt, (), args[0] if args else {})
            else:
                check_format(fmt, args, kwargs)
            return wrapped(*args, **kwargs)

        return bounded
