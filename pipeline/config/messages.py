"""pydantic's errors, translated: each one a sentence that names the key and says what to do.

pydantic's own messages never reach the user untranslated: :func:`translate` turns a
ValidationError of the whole config into one ConfigError, :func:`describe` one error into a
sentence (used for sampler params too).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Union

from pydantic import BaseModel, ValidationError

from pipeline.config.limits import PATTERN_HINTS
from pipeline.errors import ConfigError

__all__ = ["describe", "translate"]


def _unwrap(tp: Any) -> Any:
    while True:
        if hasattr(tp, "__metadata__"):  # Annotated[...]
            tp = tp.__origin__
            continue
        args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
        if getattr(tp, "__origin__", None) is Union or type(tp).__name__ == "UnionType":
            if len(args) == 1:
                tp = args[0]
                continue
        return tp


def _type_at(root: Any, loc: tuple[Any, ...]) -> Any:
    tp = root
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            tp = next(
                (f.annotation for n, f in tp.model_fields.items() if part in (n, f.alias)), None
            )
        elif getattr(tp, "__origin__", None) in (list, tuple) and isinstance(part, int):
            tp = tp.__args__[0]
        elif getattr(tp, "__origin__", None) is dict:
            tp = tp.__args__[1]
        else:
            return None
    return _unwrap(tp)


def _allowed_keys(root: Any, loc: tuple[Any, ...]) -> list[str]:
    tp = _type_at(root, loc)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or n for n, f in tp.model_fields.items() if n not in ("base_dir", "source")]
    return []

def describe(err: dict[str, Any], root: Any, loc: tuple[Any, ...], prefix: tuple[Any, ...] = (),
             column_types: Iterable[str] = ()) -> str:
    """One pydantic error (an item of ``ValidationError.errors()``) as a sentence with the fix.
    ``loc`` is relative to ``root`` (a model class); ``prefix`` only shows in the message;
    ``column_types``: the ``type:`` names a column may have, offered when a column's is wrong."""
    kind, msg = err["type"], err["msg"]
    field = ".".join(str(p) for p in prefix + loc)
    if kind == "missing":
        return f"missing required key '{field}'; add it"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return f"unknown key '{field}'{hint}; remove it or fix its spelling"
    if kind == "union_tag_invalid":
        return f"unknown column type '{err['ctx']['tag']}'; use one of: {', '.join(column_types)}"
    if kind == "union_tag_not_found":
        return f"missing required key 'type'; set it to one of: {', '.join(column_types)}"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif kind == "string_pattern_mismatch":
        msg = PATTERN_HINTS.get(err.get("ctx", {}).get("pattern"), msg)
    got = err.get("input")
    if kind != "value_error" and not isinstance(got, (dict, list)) and loc:
        msg = f"{msg} (got {got!r})"
    return f"{field}: {msg}" if field else msg


def translate(exc: ValidationError, raw: dict[str, Any], where: str, root: type[BaseModel],
              column_types: Mapping[str, type[BaseModel]]) -> ConfigError:
    """The ConfigError of ``exc``, raised validating ``raw`` (the file's mapping) as ``root``: one
    problem, or "N problems:" with one line each, named by column (``column_types``: the model
    of each ``type:``) where the problem is inside one. ``where``: the file, for the message."""
    problems: list[tuple[str | None, str]] = []
    entries = raw.get("columns") if isinstance(raw.get("columns"), list) else []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if len(loc) >= 2 and loc[0] == "columns" and isinstance(loc[1], int) and loc[1] < len(entries):
            entry = entries[loc[1]]
            entry = entry if isinstance(entry, dict) else {}
            name = entry.get("name")
            label = name if isinstance(name, str) and name else f"#{loc[1] + 1}"
            cls = column_types.get(entry.get("type")) if isinstance(entry.get("type"), str) else None
            rest = loc[2:]
            if cls is not None and rest[:1] == (entry["type"],):
                rest = rest[1:]
            if err["type"] == "model_attributes_type":
                problems.append((label, "a column must be a mapping with name:, type: and its keys"))
            else:
                problems.append((label, describe(err, cls, rest, column_types=column_types)))
        else:
            problems.append((None, describe(err, root, loc, column_types=column_types)))
    if len(problems) == 1:
        column, text = problems[0]
        return ConfigError(text, path=where, column=column)
    columns = {c for c, _ in problems}
    lines = [f"column '{c}': {t}" if c is not None else t for c, t in problems]
    only = columns.pop() if len(columns) == 1 else None
    if only is not None:
        lines = [t for _, t in problems]
    return ConfigError(
        f"{len(problems)} problems:\n  " + "\n  ".join(lines), path=where, column=only
    )
