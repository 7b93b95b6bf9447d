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

Whether a value matches the column's JSON Schema is :mod:`pipeline.json_schemas`' to say.
"""

from __future__ import annotations

import json
import math
import re
import threading
from typing import Any, Callable, Iterator


__all__ = ["MalformedAnswer", "extract_json", "text_problem"]


class MalformedAnswer(Exception):
    """An answer that cannot be used; the message says why, in words for the model."""


# raw_decode attempts of step 4 per answer: bounds the work on a long answer full of brackets.
_MAX_SCAN_STARTS = 200


class _Reader:
    """JSON as Python's ``json`` reads it (raw control characters in strings: ``strict=False``),
    except that NaN, Infinity, a float past the double's range and an integer of over 4,300
    digits are read as a stand-in value, so the value around them is still found whole (and
    none inside it taken for the answer), and :attr:`problem` says which: JSON has none of them.
    One per thread (:func:`_reader`): an answer is read start to end without a pause."""

    __slots__ = ("decoder", "problem")

    def __init__(self) -> None:
        self.problem: str | None = None
        self.decoder = json.JSONDecoder(strict=False, parse_constant=self._constant, parse_float=self._float,
                                        parse_int=self._int)

    def _constant(self, name: str) -> float:
        self.problem = self.problem or f"it holds {name}, which JSON does not allow; write a number"
        return 0.0

    def _float(self, text: str) -> float:
        value = float(text)
        if math.isinf(value):
            self.problem = self.problem or f"it holds {text[:40]}, a number too large to keep; write a smaller one"
        return value

    def _int(self, text: str) -> int:
        try:
            return int(text)
        except ValueError:  # Python's limit on the digits of an integer (4,300)
            self.problem = self.problem or "it holds a number with too many digits"
            return 0


_READERS = threading.local()


def _reader() -> _Reader:
    reader = getattr(_READERS, "reader", None)
    if reader is None:
        reader = _READERS.reader = _Reader()
    return reader


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


class _Found:
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


class _NotJson:
    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def _loads(reader: _Reader, candidate: str) -> _Found | _NotJson:
    reader.problem = None
    try:
        value = reader.decoder.decode(candidate)
    except json.JSONDecodeError as exc:
        return _NotJson(f"it is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
    except RecursionError:
        return _NotJson("it is nested too deeply to read")
    return _Found(value) if reader.problem is None else _NotJson(reader.problem)


def _candidates(text: str) -> Iterator[_Found | _NotJson]:
    """The values of steps 1-4, in order, and a _NotJson for each step that found none."""
    reader = _reader()
    yield _loads(reader, text.strip())
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
            yield _loads(reader, body)
            yield from _inside(reader, body)
        if sure:
            return
    # No think block, or only a lone "</think>" that may as well sit in a JSON string.
    yield from _inside(reader, text)


def _inside(reader: _Reader, body: str) -> Iterator[_Found | _NotJson]:
    """Steps 3 and 4 on ``body``: its fenced blocks, then its top-level JSON values."""
    fenced = False
    for block in _fenced_blocks(body):
        fenced = True
        if block.strip():
            yield _loads(reader, block.strip())
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
        reader.problem = None
        try:
            value, after = reader.decoder.raw_decode(body, start)
        except json.JSONDecodeError:
            continue
        except RecursionError:  # too deep to read: what lies inside it would be a nested value
            yield _NotJson("it is nested too deeply to read")
            return
        yield _Found(value) if reader.problem is None else _NotJson(reader.problem)
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
