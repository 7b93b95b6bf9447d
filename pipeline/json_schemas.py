"""JSON Schemas of ``llm_structured`` / ``llm_judge`` columns: their validators (the config
builds one for every ``output_schema`` when it is loaded, so a run never meets one it cannot
use; a judge's schema is made by :func:`pipeline.generators.llm.judge_schema`, valid by construction),
and an answer's value judged against one (:func:`schema_problem`, the text quoted back to the
model in a re-ask).

The validator is jsonschema-rs: ~0.2 us per judge answer, where the pure-Python ``jsonschema``
took ~30 us on the event loop (1-2 % of the LLM benchmark's makespan, issue 12). Imported by the
config without the HTTP layer (``pipeline.llm``).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pipeline.values import valid_unicode_deep

__all__ = ["TOO_DEEP", "schema_json_form", "schema_problem", "schema_validator"]

#: The problem of an answer read and checked but too deep to walk (``valid_unicode_deep``).
TOO_DEEP = "it is nested too deeply to keep; answer with a flatter value"


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
        elif message.endswith(' is not a "regex"') and _python_regex(exc.instance):
            message += (" (patterns are ECMA 262 regular expressions, JSON Schema's dialect, not Python's: no "
                        "\\Z, (?#...), (?>...) or {,n}; write $ and {0,n})")
        where = "/".join(str(part) for part in exc.instance_path)
        raise ValueError(message + (f" (at {where})" if where else "")) from None


def schema_json_form(schema: Any) -> Any:
    """``schema`` as JSON holds it, as the server is sent it and as the run's stored config has
    it (pydantic's JSON form, so a config saved by an earlier version keeps its fingerprint):
    keys as text (a YAML key ``2023:`` is ``"2023"``), dates and times in ISO 8601 (an unquoted
    YAML date). ValueError for a value JSON cannot hold (``.inf``, ``.nan``, binary)."""
    import pydantic_core

    def default(value: Any) -> Any:  # what json cannot write: dates, times (pydantic's form)
        try:
            return pydantic_core.to_jsonable_python(value)
        except ValueError as exc:  # PydanticSerializationError
            raise TypeError(str(exc)) from None

    try:
        return json.loads(json.dumps(schema, default=default, allow_nan=False))
    except TypeError as exc:
        raise ValueError(f"it holds a value JSON cannot hold ({str(exc)[:200]})") from None
    except ValueError:
        raise ValueError("it holds .inf or .nan, which JSON cannot hold; write a number") from None


def schema_problem(validator: Any, value: Any) -> str | None:
    """None when ``value`` is valid for ``validator`` (:func:`schema_validator`), else the
    problem nearest the root (``at a/b: <message>``), to be quoted back to the model."""
    try:
        return _schema_problem(validator, value)
    except UnicodeEncodeError:  # a lone surrogate (a "\\ud83d" escape) cannot cross into the
        try:  # validator: judged as it is stored, with U+FFFD
            value = valid_unicode_deep(value)
        except RecursionError:
            return TOO_DEEP
        return _schema_problem(validator, value)


def _schema_problem(validator: Any, value: Any) -> str | None:
    if validator.is_valid(value):
        return None
    try:
        error = min(validator.iter_errors(value), key=lambda e: len(e.instance_path))
    except UnicodeEncodeError:
        raise
    except ValueError:  # it could not describe the problem (a value nested past its depth), or
        # found none to describe (is_valid and iter_errors disagreeing): it is still not valid
        return "it does not match the schema"
    where = "/".join(str(part) for part in error.instance_path) or "(root)"
    return f"it does not match the schema at {where}: {error.message}"


def _python_regex(pattern: Any) -> bool:
    """Whether ``pattern`` is a regular expression Python's ``re`` compiles (then a refusal is
    about the dialect, not a typo)."""
    try:
        re.compile(pattern)
    except (re.error, TypeError, ValueError, RecursionError, OverflowError):
        return False
    return True
