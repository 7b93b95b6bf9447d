"""What is taken from a model's answer (contract section 10, "LLM answers").

Two functions, both pure and cheap on the common answer (one ``json.loads`` for a structured
answer that is nothing but JSON):

:func:`text_problem`
    Why an answer cannot be kept at all, or None: text that is empty or only whitespace
    (also when the server filled only a reasoning field such as ``reasoning_content`` and
    sent ``content: ""``) is malformed for every ``llm_*`` column type.

:func:`extract_json`
    The JSON value of an ``llm_structured`` / ``llm_judge`` answer, tried in this order:

    1. the whole text;
    2. the text after a leading ``<think>...</think>`` block (a reasoning model's thoughts;
       a lone ``</think>`` counts too, as servers whose chat template opens the block send it);
    3. the body of a fenced block (```` ```json ````, plain ```` ``` ````, or a longer
       fence), closed by a fence of at least as many backticks at the START of a line, so a
       JSON string holding ```` ``` ```` is not cut; blocks are tried in order;
    4. the first complete JSON value in the text, prose around it ignored
       (``json.JSONDecoder.raw_decode`` tried from each ``{`` and ``[``; never from inside a
       value already found, so a nested object is never taken for the answer).

    Steps 3 and 4 read the text after the think block, never the thoughts. A value found by
    a step is returned only if ``check`` accepts it (the caller's JSON Schema), so a
    ``[1]`` in the prose does not hide the object after it; otherwise the next one is tried.
    Strings may hold raw control characters (a newline inside a string: ``strict=False``).
    Nothing is repaired: a trailing comma or a cut object is malformed.

Both raise or return :class:`MalformedAnswer`, whose message is written to be quoted back to
the model in a re-ask ("That answer is not usable: <message>").

:func:`schema_validator` and :func:`schema_problem` check a value against the column's JSON
Schema (jsonschema-rs: ~0.2 us per judge answer where the pure-Python ``jsonschema`` took ~30 us
on the event loop, 1 % of the LLM benchmark's makespan); the config checks ``output_schema``
with the same builder, so a schema that passes ``pipeline validate`` can always be used.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from typing import Any, Callable, Iterator

from pipeline.values import valid_unicode_deep

__all__ = ["MalformedAnswer", "extract_json", "schema_json_form", "schema_problem", "schema_validator", "text_problem"]


class MalformedAnswer(Exception):
    """An answer that cannot be used; the message says why, in words for the model."""


# raw_decode attempts of step 4 per answer: bounds the work on a long answer full of brackets.
_MAX_SCAN_STARTS = 200



class _NotJsonNumber(ValueError):
    """NaN, Infinity or a float past the double's range: Python's json reads them, JSON has none."""


def _no_constant(name: str) -> float:
    raise _NotJsonNumber(f"it holds {name}, which JSON does not allow; write a number")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _NotJsonNumber(f"it holds {text[:40]}, a number too large to keep; write a smaller one")
    return value


_DECODER = json.JSONDecoder(strict=False, parse_constant=_no_constant, parse_float=_finite)
_THINK_OPEN = re.compile(r"\s*<think>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)
# An opening fence: three or more backticks, an optional info string (json, JSON, jsonc, ...)
# and the end of its line. It may follow prose on its line ("Here it is: ```json").
_FENCE_OPEN = re.compile(r"(`{3,})[ \t]*([A-Za-z0-9_+.-]*)[^\S\r\n]*\r?\n")
_JSON_START = re.compile(r"[{\[]")


def text_problem(text: str, *, reasoning_chars: int = 0) -> str | None:
    """Why ``text`` is malformed whatever the column type, or None when it has content.
    ``reasoning_chars``: the length of the answer's reasoning field, named in the message."""
    if text and not text.isspace():
        return None
    if reasoning_chars:
        return ("it is empty: the server sent only reasoning (reasoning_content or reasoning), no answer "
                "text; write the answer itself")
    return "it is empty" if not text else "it is only whitespace"


def extract_json(text: str, check: Callable[[Any], str | None] | None = None) -> Any:
    """The JSON value of an answer (see the module docstring for the order of the steps).

    ``check(value)`` returns None to accept a candidate value or a problem (text) to go on
    looking; the problem of the first value found is the one reported when none is accepted.
    Raises :class:`MalformedAnswer`.
    """
    problem = text_problem(text)
    if problem is not None:
        raise MalformedAnswer(problem)
    first_problem: str | None = None
    parse_error: str | None = None
    for found in _candidates(text):
        if isinstance(found, _NotJson):
            parse_error = found.problem  # the last one: the most specific step that failed
            continue
        if check is None:
            return found.value
        verdict = check(found.value)
        if verdict is None:
            return found.value
        first_problem = first_problem or verdict
    if first_problem is not None:
        raise MalformedAnswer(first_problem)
    raise MalformedAnswer(parse_error or "it holds no JSON value")


def schema_validator(schema: dict[str, Any] | bool) -> Any:
    """A validator of ``schema`` (its draft named by ``$schema``; 2020-12 without one). As the
    pure-Python ``jsonschema`` does by default, ``format`` is not asserted; nothing is fetched
    (a ``$ref`` to a URL is refused here, not looked up during a run). Regular expressions are
    ECMA 262's, as the specification says (``\\d`` is an ASCII digit, ``$`` does not match before a
    final newline). ValueError, naming the problem and where it is, for a schema that is not a
    valid JSON Schema (an unknown ``$schema``, a bad keyword value or regex, a ``$ref`` to
    nothing)."""
    import jsonschema_rs

    try:  # a lone surrogate cannot cross into the validator: it is U+FFFD there, as in the values
        return jsonschema_rs.validator_for(valid_unicode_deep(schema), validate_formats=False, offline=True)
    except jsonschema_rs.ValidationError as exc:
        message = exc.message
        if message.startswith("Unknown meta-schema"):
            message = (f"unknown $schema {schema.get('$schema')!r}: drafts 4, 6, 7, 2019-09 and 2020-12 are known "
                       "(without $schema: 2020-12)")
        elif message.endswith(' is not a "regex"'):
            message += (" (patterns are ECMA 262 regular expressions, JSON Schema's dialect: no \\Z, (?#...), "
                        "(?>...) or {,n}; write $ and {0,n})")
        where = "/".join(str(part) for part in exc.instance_path)
        raise ValueError(message + (f" (at {where})" if where else "")) from None


def schema_json_form(schema: Any) -> Any:
    """``schema`` as JSON holds it, as the server is sent it: keys as text (a YAML key ``2023:``
    is ``"2023"``), dates and times in ISO 8601 (an unquoted YAML date). ValueError for a value
    JSON cannot hold (``.inf``, ``.nan``, binary)."""
    def default(value: Any) -> str:
        if isinstance(value, (datetime.date, datetime.time)):  # datetime.datetime too
            return value.isoformat()
        raise TypeError(f"it holds a {type(value).__name__} value, which JSON cannot hold")

    try:
        return json.loads(json.dumps(schema, default=default, allow_nan=False))
    except ValueError:
        raise ValueError("it holds .inf or .nan, which JSON cannot hold; write a number") from None
    except TypeError as exc:
        raise ValueError(str(exc)) from None


def schema_problem(validator: Any, value: Any) -> str | None:
    """None when ``value`` is valid for ``validator`` (:func:`schema_validator`), else the
    problem nearest the root (``at a/b: <message>``), to be quoted back to the model."""
    try:
        return _schema_problem(validator, value)
    except UnicodeEncodeError:  # a lone surrogate (a "\\ud83d" escape) cannot cross into the
        return _schema_problem(validator, valid_unicode_deep(value))  # validator: judged as stored


def _schema_problem(validator: Any, value: Any) -> str | None:
    if validator.is_valid(value):
        return None
    try:
        error = min(validator.iter_errors(value), key=lambda e: len(e.instance_path))
    except UnicodeEncodeError:
        raise
    except ValueError:  # it could not describe the problem (a value nested past its depth)
        return "it does not match the schema"
    where = "/".join(str(part) for part in error.instance_path) or "(root)"
    return f"it does not match the schema at {where}: {error.message}"


class _Found:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _NotJson:
    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _loads(candidate: str) -> _Found | _NotJson:
    try:
        return _Found(_DECODER.decode(candidate))
    except json.JSONDecodeError as exc:
        return _NotJson(f"it is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
    except RecursionError:
        return _NotJson("it is nested too deeply to read")
    except _NotJsonNumber as exc:
        return _NotJson(str(exc))
    except ValueError:  # Python's limit on the digits of an integer (4,300)
        return _NotJson("it holds a number with too many digits")


def _candidates(text: str) -> Iterator[_Found | _NotJson]:
    """The values of steps 1-4, in order, and a _NotJson for each step that found none."""
    yield _loads(text.strip())
    body, sure = _after_think(text)
    if body is None:
        yield _NotJson("it holds only an unfinished <think> block and no answer after it")
        return
    if body is not text:
        body = body.strip()
        if not body:
            if sure:
                yield _NotJson("it holds only a <think> block and no answer after it")
                return
        else:
            yield _loads(body)
            yield from _inside(body)
        if sure:
            return
    # No think block, or only a lone "</think>" that may as well sit in a JSON string.
    yield from _inside(text)


def _inside(body: str) -> Iterator[_Found | _NotJson]:
    """Steps 3 and 4 on ``body``: its fenced blocks, then its top-level JSON values."""
    fenced = False
    for block in _fenced_blocks(body):
        fenced = True
        if block.strip():
            yield _loads(block.strip())
        else:
            yield _NotJson("its fenced block is empty")
    starts = 0
    after = 0  # values inside a value found are not values of the text: never a nested object
    for match in _JSON_START.finditer(body):
        start = match.start()
        if start < after:
            continue
        starts += 1
        if starts > _MAX_SCAN_STARTS:
            break
        try:
            value, after = _DECODER.raw_decode(body, start)
        except (ValueError, RecursionError):  # not JSON; or too deep, or too many digits, to read
            continue
        yield _Found(value)
    if not starts and not fenced:
        yield _NotJson("it holds no JSON object or array")


def _after_think(text: str) -> tuple[str | None, bool]:
    """``(the text after a leading think block, sure)``: ``text`` itself (the same object) when
    there is none; None when a think block opens and never closes (the answer is only
    thoughts). ``sure`` is False for a lone ``</think>`` with no opening tag: servers whose chat
    template opens the block send that, but so may a JSON string amid prose."""
    opened = _THINK_OPEN.match(text)
    closed = _THINK_CLOSE.search(text, opened.end() if opened else 0)
    if closed is None:
        return (None, True) if opened else (text, True)
    return text[closed.end():], opened is not None


def _fenced_blocks(text: str) -> Iterator[str]:
    """The bodies of the fenced blocks of ``text``, in order. A block closes at a line that
    starts (after spaces) with at least as many backticks as opened it; an unclosed block runs
    to the end of the text."""
    pos = 0
    while True:
        opening = _FENCE_OPEN.search(text, pos)
        if opening is None:
            return
        ticks = len(opening.group(1))
        start = opening.end()
        closing = re.compile(r"^[ \t]*`{%d,}" % ticks, re.MULTILINE).search(text, start)
        if closing is None:
            yield text[start:]
            return
        yield text[start:closing.start()]
        pos = text.find("\n", closing.end())
        if pos < 0:
            return
