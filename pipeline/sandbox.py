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

What is not bounded: the cost of one call into C on values a record already holds (sorting a
list of a million items). Such values come from the data, not from the template.
"""

from __future__ import annotations

import functools
import re
import string
import time
import types
from contextvars import ContextVar
from typing import Any, Callable

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum
from markupsafe import Markup, soft_str

from pipeline.errors import GenerationError

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

#: Loop iterations, calls and operators per render.
MAX_STEPS = 1_000_000
#: Characters of a string, or items of a list, that one operation of a template may make.
MAX_SIZE = 10_000_000
#: Characters a render may output, its ``{% set %}`` blocks and macros included.
MAX_OUTPUT = 50_000_000
#: Steps a macro call counts for (a call renders the macro's body into a buffer of its own).
MACRO_STEPS = 10
#: Bits of an integer a template may compute (10**30000 has about 100,000).
MAX_INT_BITS = 100_000
_clock = time.monotonic


class TemplateLimitError(GenerationError):
    """A template exceeded one of the bounds of this module. Not retryable."""


class SliceSpent(Exception):
    """Internal: a render on the event loop used its slice; it starts over in a thread."""


class Budget:
    """What one render may still spend: steps, output characters, time. Not thread-safe: one
    render, one thread."""

    __slots__ = ("steps", "output", "deadline", "timeout_s", "slice", "cancelled", "_span_s")

    def __init__(self, timeout_s: float, *, slice_s: float | None = None) -> None:
        self.steps = MAX_STEPS
        self.output = MAX_OUTPUT
        self.timeout_s = timeout_s
        #: a slice ends with SliceSpent (the render goes on elsewhere), a timeout with an error
        self.slice = slice_s is not None
        self._span_s = slice_s if slice_s is not None else timeout_s
        self.deadline = float("inf")  # set by start(): time spent waiting for a thread is free
        self.cancelled = False  # set from another thread: the render's caller is gone

    def start(self) -> None:
        """Start the clock (when the render starts, not when it is queued for a thread)."""
        self.deadline = _clock() + self._span_s

    def tick(self) -> None:
        # The clock is read on every step (~50 ns): one step may be slow (a sort of a long list).
        self.steps -= 1
        if self.steps < 0 or self.cancelled or _clock() > self.deadline:
            self.check()

    def check(self) -> None:
        if self.steps < 0:
            raise TemplateLimitError(
                f"the template took more than {MAX_STEPS:,} steps (loop iterations, calls and operators); "
                "loop over less"
            )
        if self.cancelled:
            raise TemplateLimitError("the render was cancelled")
        if _clock() > self.deadline:
            if self.slice:
                raise SliceSpent()
            raise TemplateLimitError(
                f"the template ran longer than render_timeout_s = {self.timeout_s:g} s; "
                "make it do less, or raise settings.render_timeout_s"
            )

    def spend_output(self, chars: int) -> None:
        self.output -= chars
        if self.output < 0:
            raise TemplateLimitError(f"the template output more than {MAX_OUTPUT:,} characters")


#: The budget of the render running in this thread or task (None outside a bounded render).
CURRENT: ContextVar[Budget | None] = ContextVar("pipeline_template_budget", default=None)


def _tick() -> None:
    budget = CURRENT.get()
    if budget is not None:
        budget.tick()


def _too_big(what: str, size: int, limit: int = MAX_SIZE, unit: str = "characters or items") -> None:
    if size > limit:
        raise TemplateLimitError(f"{what} would make a value of {size:,} {unit}; the limit is {limit:,}")


def size_of(value: Any, limit: int = MAX_SIZE) -> int:
    """Characters of a str or bytes; items of a container, plus those of its items (recursively);
    1 for anything else. Stops counting once over ``limit``."""
    if isinstance(value, (str, bytes, bytearray)):
        return len(value)
    if isinstance(value, (list, tuple, set, frozenset, dict)):
        total = len(value)
        for item in (value.items() if isinstance(value, dict) else value):
            if total > limit:
                break
            total += size_of(item, limit - total)
        return total
    return 1


# -- operators -----------------------------------------------------------------------------------

_SEQUENCES = (str, bytes, list, tuple)


def _int(value: Any) -> bool:
    return isinstance(value, int)


def _check_mul(left: Any, right: Any) -> None:
    if isinstance(left, _SEQUENCES) and _int(right):
        _too_big("'*'", len(left) * max(right, 0))
    elif isinstance(right, _SEQUENCES) and _int(left):
        _too_big("'*'", len(right) * max(left, 0))
    elif _int(left) and _int(right):
        _too_big("'*'", left.bit_length() + right.bit_length(), MAX_INT_BITS, "bits")


def _check_pow(left: Any, right: Any) -> None:
    if _int(left) and _int(right) and right > 0 and left not in (0, 1, -1):
        _too_big("'**'", left.bit_length() * right, MAX_INT_BITS, "bits")


def _check_add(left: Any, right: Any) -> None:
    if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        _too_big("'+'", len(left) + len(right))


# printf-style conversions: %(name)s, flags, width, precision.
_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")


def check_printf(fmt: str, args: Any) -> None:
    """Refuse a ``fmt % args`` whose result would exceed MAX_SIZE (widths included)."""
    specs = _PRINTF.findall(fmt)
    widths = 0
    for width, precision, _ in specs:
        for number in (width, precision):
            if number == "*":
                raise TemplateLimitError("a '*' width in a % format is not allowed in templates; write the number")
            if number:
                widths += int(number) if len(number) < 10 else MAX_SIZE + 1
    values = args.values() if isinstance(args, dict) else args if isinstance(args, tuple) else (args,)
    largest = max((size_of(v) for v in values), default=0)
    _too_big("'%'", len(fmt) + widths + len(specs) * largest)


def check_format(fmt: str, args: Any, kwargs: Any) -> None:
    """Refuse a ``fmt.format(...)`` whose result would exceed MAX_SIZE (widths included)."""
    fields = widths = 0
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError:
        return  # format() itself says what is wrong
    for _, field, spec, _ in parsed:
        if field is None:
            continue
        fields += 1
        if spec and "{" in spec:
            raise TemplateLimitError("a nested {...} inside a format spec is not allowed in templates")
        for number in re.findall(r"\d+", spec or ""):
            widths += int(number) if len(number) < 10 else MAX_SIZE + 1
    values = [*args, *(kwargs.values() if isinstance(kwargs, dict) else ())]
    largest = max((size_of(v) for v in values), default=0)
    _too_big("format()", len(fmt) + widths + fields * largest)


# -- concatenation and output ---------------------------------------------------------------------


def _bounded_concat(parts: Any) -> str:
    parts = parts if isinstance(parts, list) else list(parts)
    _too_big("joining output", sum(map(len, parts)), MAX_OUTPUT, "characters")
    return "".join(parts)


def _str_join(seq: Any) -> str:
    parts = [str(x) for x in seq]
    _too_big("'~'", sum(map(len, parts)))
    return "".join(parts)


def _markup_join(seq: Any) -> str:
    parts = [soft_str(x) for x in seq]
    _too_big("'~'", sum(map(len, parts)))
    if any(hasattr(part, "__html__") for part in parts):
        return Markup("").join(parts)
    return "".join(parts)


# Replaces the runtime helpers of the same names in every compiled template's module.
_RUNTIME = {"str_join": _str_join, "markup_join": _markup_join}


# -- filters, globals and str methods that grow a value -------------------------------------------


def _count(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) else 0


def _c_center(value: Any, width: int = 80, *_: Any, **__: Any) -> None:
    _too_big("center", width if _int(width) else 0)


def _c_indent(s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    lines = str(s).count("\n") + 1 if isinstance(s, str) else 1
    step = width if _int(width) else len(width) if isinstance(width, str) else 0
    _too_big("indent", _count(s) + lines * max(step, 0))


def _c_join(value: Any, d: Any = "", attribute: Any = None, *_: Any, **__: Any) -> None:
    if isinstance(value, (list, tuple)):
        items = len(value) if attribute is not None else size_of(value)
        _too_big("join", items + max(len(value) - 1, 0) * (len(d) if isinstance(d, str) else 1))


def _c_replace(s: Any, old: Any, new: Any, count: Any = None, *_: Any, **__: Any) -> None:
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str) and len(new) > len(old):
        times = s.count(old) if old else len(s) + 1
        if _int(count) and count >= 0:
            times = min(times, count)
        _too_big("replace", len(s) + times * (len(new) - len(old)))


def _c_format(value: Any, *args: Any, **kwargs: Any) -> None:
    if isinstance(value, str):
        check_printf(value, kwargs or args)


def _c_wordwrap(s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None,
                *_: Any, **__: Any) -> None:
    if isinstance(s, str) and isinstance(wrapstring, str):
        _too_big("wordwrap", len(s) * (1 + len(wrapstring)))


def _c_batch(value: Any, linecount: Any = 1, fill_with: Any = None, *_: Any, **__: Any) -> None:
    _too_big("batch", linecount if _int(linecount) else 0)


def _c_slice(value: Any, slices: Any = 1, fill_with: Any = None, *_: Any, **__: Any) -> None:
    _too_big("slice", slices if _int(slices) else 0)


def _c_sum(iterable: Any, attribute: Any = None, start: Any = 0, *_: Any, **__: Any) -> None:
    if not isinstance(start, (int, float)):
        raise TemplateLimitError("sum only adds numbers in templates (adding lists or strings is quadratic)")


_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": _c_center, "indent": _c_indent, "join": _c_join, "replace": _c_replace,
    "format": _c_format, "wordwrap": _c_wordwrap, "batch": _c_batch, "slice": _c_slice, "sum": _c_sum,
}


# Filters whose input is made a list first, so that its size can be known (range, generators).
_MATERIALIZED = frozenset({"join"})


def _guard_filter(name: str, original: Callable[..., Any], check: Callable[..., None]) -> Callable[..., Any]:
    # Filters that take the environment or context first keep that (jinja_pass_arg is copied).
    skip = 1 if hasattr(original, "jinja_pass_arg") else 0
    materialize = name in _MATERIALIZED

    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        if materialize and len(args) > skip and not isinstance(args[skip], (str, list, tuple)):
            args = (*args[:skip], list(args[skip]), *args[skip + 1:])
        check(*args[skip:], **kwargs)
        return original(*args, **kwargs)

    return guarded


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    _too_big("lipsum", n * max * 12 if _int(n) and _int(max) else 0)
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _m_width(s: Any, width: Any = 0, *_: Any) -> None:
    _too_big("str method", width if _int(width) else 0)


def _m_expandtabs(s: Any, tabsize: Any = 8, *_: Any) -> None:
    _too_big("expandtabs", len(s) + s.count("\t") * (tabsize if _int(tabsize) else 0))


_STR_METHOD_CHECKS: dict[str, Callable[..., None]] = {
    "center": _m_width, "ljust": _m_width, "rjust": _m_width, "zfill": _m_width,
    "expandtabs": _m_expandtabs, "replace": lambda s, old="", new="", count=-1, *_: _c_replace(s, old, new, count),
}


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
        template.root_render_func.__globals__.update(_RUNTIME)  # the module of this template
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
                return _bounded_concat(self.root_render_func(context))
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
    concat = staticmethod(_bounded_concat)  # joins {% set %} blocks, macros and call blocks

    def __init__(self, *args: Any, timeout_s: float = 10.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: the time limit of :meth:`BoundedTemplate.render`
        self.timeout_s = timeout_s
        for name, check in _FILTER_CHECKS.items():
            self.filters[name] = _guard_filter(name, self.filters[name], check)
        self.globals["lipsum"] = _lipsum
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
        _tick()
        if operator == "*":
            _check_mul(left, right)
        elif operator == "+":
            _check_add(left, right)
        elif operator == "**":
            _check_pow(left, right)
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
            check = _STR_METHOD_CHECKS.get(__obj.__name__)
            if check is not None:
                check(__obj.__self__, *args)
            elif __obj.__name__ == "join" and args:
                items = list(args[0])
                _c_join(items, __obj.__self__)
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
