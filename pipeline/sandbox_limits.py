"""The bounds of :mod:`pipeline.sandbox` (its docstring says what each one bounds and why):
the limits, the :class:`Budget` one render spends, and the checks that refuse a value BEFORE
making it.

Every check raises :class:`TemplateLimitError` (a GenerationError, not retryable) with a message
that names the bound; :class:`SliceSpent` is internal (a render on the event loop used its slice
and starts over in a thread). Sizes are characters of a string or items of a container, integer
sizes are bits, times are seconds (``time.monotonic``).

The checks are plain functions; the environment of :mod:`pipeline.sandbox` calls them:
:data:`FILTER_CHECKS` before the filter of the same name (through :func:`guard_filter`),
:data:`STR_METHOD_CHECKS` before a ``str`` method, ``check_*`` before an operator, and
:data:`RUNTIME` replaces Jinja2's runtime helpers of the same names in every compiled template.
"""

from __future__ import annotations

import functools
import re
import string
import time
from contextvars import ContextVar
from typing import Any, Callable

from jinja2.utils import generate_lorem_ipsum
from markupsafe import Markup, soft_str

from pipeline.errors import GenerationError

__all__ = [
    "CURRENT",
    "MACRO_STEPS",
    "MAX_INT_BITS",
    "MAX_OUTPUT",
    "MAX_SIZE",
    "MAX_STEPS",
    "Budget",
    "SliceSpent",
    "TemplateLimitError",
    "check_format",
    "check_printf",
    "size_of",
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


def tick() -> None:
    """One step of the render running here (nothing outside a bounded render)."""
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


def check_mul(left: Any, right: Any) -> None:
    """Refuse a ``left * right`` past MAX_SIZE (sequences) or MAX_INT_BITS (integers)."""
    if isinstance(left, _SEQUENCES) and _int(right):
        _too_big("'*'", len(left) * max(right, 0))
    elif isinstance(right, _SEQUENCES) and _int(left):
        _too_big("'*'", len(right) * max(left, 0))
    elif _int(left) and _int(right):
        _too_big("'*'", left.bit_length() + right.bit_length(), MAX_INT_BITS, "bits")


def check_pow(left: Any, right: Any) -> None:
    """Refuse a ``left ** right`` of more than MAX_INT_BITS bits."""
    if _int(left) and _int(right) and right > 0 and left not in (0, 1, -1):
        _too_big("'**'", left.bit_length() * right, MAX_INT_BITS, "bits")


def check_add(left: Any, right: Any) -> None:
    """Refuse a ``left + right`` of sequences past MAX_SIZE."""
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


def bounded_concat(parts: Any) -> str:
    """``"".join(parts)``, refused past MAX_OUTPUT characters."""
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
RUNTIME = {"str_join": _str_join, "markup_join": _markup_join}


# -- filters, globals and str methods that grow a value -------------------------------------------


def _count(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict, set, frozenset)) else 0


def _c_center(value: Any, width: int = 80, *_: Any, **__: Any) -> None:
    _too_big("center", width if _int(width) else 0)


def _c_indent(s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
    lines = str(s).count("\n") + 1 if isinstance(s, str) else 1
    step = width if _int(width) else len(width) if isinstance(width, str) else 0
    _too_big("indent", _count(s) + lines * max(step, 0))


def check_join(value: Any, d: Any = "", attribute: Any = None, *_: Any, **__: Any) -> None:
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


FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": _c_center, "indent": _c_indent, "join": check_join, "replace": _c_replace,
    "format": _c_format, "wordwrap": _c_wordwrap, "batch": _c_batch, "slice": _c_slice, "sum": _c_sum,
}


# Filters whose input is made a list first, so that its size can be known (range, generators).
_MATERIALIZED = frozenset({"join"})


def guard_filter(name: str, original: Callable[..., Any], check: Callable[..., None]) -> Callable[..., Any]:
    """``original`` (the filter ``name``), counting a step and calling ``check`` on its arguments first."""
    # Filters that take the environment or context first keep that (jinja_pass_arg is copied).
    skip = 1 if hasattr(original, "jinja_pass_arg") else 0
    materialize = name in _MATERIALIZED

    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        tick()
        if materialize and len(args) > skip and not isinstance(args[skip], (str, list, tuple)):
            args = (*args[:skip], list(args[skip]), *args[skip + 1:])
        check(*args[skip:], **kwargs)
        return original(*args, **kwargs)

    return guarded


def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    """Jinja2's ``lipsum`` global, refused past MAX_SIZE characters."""
    _too_big("lipsum", n * max * 12 if _int(n) and _int(max) else 0)
    return generate_lorem_ipsum(n=n, html=html, min=min, max=max)


def _m_width(s: Any, width: Any = 0, *_: Any) -> None:
    _too_big("str method", width if _int(width) else 0)


def _m_expandtabs(s: Any, tabsize: Any = 8, *_: Any) -> None:
    _too_big("expandtabs", len(s) + s.count("\t") * (tabsize if _int(tabsize) else 0))


STR_METHOD_CHECKS: dict[str, Callable[..., None]] = {
    "center": _m_width, "ljust": _m_width, "rjust": _m_width, "zfill": _m_width,
    "expandtabs": _m_expandtabs, "replace": lambda s, old="", new="", count=-1, *_: _c_replace(s, old, new, count),
}
