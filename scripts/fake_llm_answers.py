"""What the fake server (scripts/fake_llm_server.py) answers, as pure functions of the request
(the server keeps the counts, the faults and the limits):

- text: ``echo: <12 hex of sha256(last user message)> <its first 12 words>``, cut to
  ``max_tokens`` words when asked (``finish_reason`` ``length``);
- with ``response_format`` ``json_schema``: a JSON value generated from the schema (objects
  with all their properties, strings within min/maxLength, numbers and integers within their
  bounds, enums, consts, booleans, arrays of max(1, minItems) items, local ``$ref``s);
- ``usage``: word counts of the messages and of the answer;
- exact replies by name (``reply``), and OpenAI's error bodies (``error``).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from typing import Any, Callable

__all__ = ["completion", "error", "reply", "sample_from_schema", "strict_schema", "unit"]


def completion(request: dict, model: str, texts: list[str], key: str, *, malformed_marker: str | None = None,
               echoed: str | None = None) -> dict:
    """The chat completion body for ``request`` (already parsed; ``texts``: its messages' text).

    Text: ``echo: <12 hex of sha256(last user message)> <its first 12 words>``, cut to
    ``max_tokens`` words (``finish_reason`` ``length``); with a ``json_schema`` or ``json_object``
    response format, a JSON value from the schema. A request whose texts hold
    ``malformed_marker`` gets unusable output (invalid JSON, or JSON of the wrong type: which one
    is chosen by ``key``, the request's hash, so that re-asks see both). ``echoed`` replaces the
    text. ``usage`` counts words.
    """
    user = next((str(m.get("content") or "") for m in reversed(request["messages"]) if m.get("role") == "user"), "")
    # surrogatepass: a prompt may hold a lone surrogate (sent as a "\ud83d" escape); the echo
    # then carries it back the same way, as a broken model answer would.
    digest = hashlib.sha256(user.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    response_format = request.get("response_format") or {}
    wants_json = response_format.get("type") in ("json_schema", "json_object")
    schema = (response_format.get("json_schema") or {}).get("schema", {}) if wants_json else None
    finish = "stop"
    if echoed is not None:
        text = echoed
    elif malformed_marker and any(malformed_marker in text for text in texts):
        if wants_json and _hash(key) % 2 == 0:
            wrong = ["not", "an", "object"] if (schema or {}).get("type") == "object" else {"malformed": True}
            text = json.dumps(wrong)
        else:
            text = f"malformed: {{ {digest}"
    elif wants_json:
        text = json.dumps(sample_from_schema(schema or {"type": "object"}, digest))
    else:
        words = f"echo: {digest} {' '.join(user.split()[:12])}".split()
        limit = request.get("max_tokens")
        if isinstance(limit, int) and 0 < limit < len(words):
            words, finish = words[:limit], "length"
        text = " ".join(words)
    message = {"role": "assistant", "content": text}
    return _body(f"chatcmpl-{digest}", model, message, finish, texts)


def reply(chosen: dict, name: str, model: str, texts: list[str]) -> dict | bytes:
    """The exact answer ``chosen`` (one item of the server's ``replies[name]``): its ``body`` as
    it is (bytes), or a completion of its ``content`` (default ""), ``reasoning_content``,
    ``reasoning`` and ``finish_reason`` (default ``stop``)."""
    if "body" in chosen:
        body = chosen["body"]
        return body.encode() if isinstance(body, str) else json.dumps(body).encode()
    message: dict[str, Any] = {"role": "assistant", "content": chosen.get("content", "")}
    for field in ("reasoning_content", "reasoning"):
        if field in chosen:
            message[field] = chosen[field]
    return _body(f"chatcmpl-reply-{name}", model, message, chosen.get("finish_reason", "stop"), texts)


def _body(id_: str, model: str, message: dict, finish: str, texts: list[str]) -> dict:
    prompt_tokens = sum(len(t.split()) for t in texts)
    completion_tokens = len(str(message["content"] or "").split())
    return {
        "id": id_, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def sample_from_schema(schema: Any, seed: str, *, _root: Any = None, _depth: int = 0) -> Any:
    """A deterministic value (from ``seed``) that satisfies the common parts of a JSON Schema."""
    root = schema if _root is None else _root
    if not isinstance(schema, dict) or _depth > 32:
        return None

    def sub(part: Any, suffix: str) -> Any:
        return sample_from_schema(part, f"{seed}/{suffix}", _root=root, _depth=_depth + 1)

    if "$ref" in schema:
        return sub(_resolve(root, schema["$ref"]), "ref")
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][_hash(seed) % len(schema["enum"])]
    for combinator in ("anyOf", "oneOf"):
        if schema.get(combinator):
            return sub(schema[combinator][0], combinator)
    if schema.get("allOf"):
        merged = {k: v for k, v in schema.items() if k != "allOf"}
        for part in schema["allOf"]:
            merged.update(_resolve(root, part["$ref"]) if "$ref" in part else part)
        return sub(merged, "allOf")
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "array" if "items" in schema else "string"
    if kind == "object":
        properties = schema.get("properties") or {}
        value = {name: sub(part, name) for name, part in properties.items()}
        for name in schema.get("required", []):
            value.setdefault(name, sub({}, name))
        return value
    if kind == "array":
        count = max(1, schema.get("minItems", 0))
        if "maxItems" in schema:
            count = min(count, schema["maxItems"])
        items = schema.get("items") if isinstance(schema.get("items"), dict) else {}
        return [sub(items, str(i)) for i in range(count)]
    if kind == "integer":
        return _integer(schema, _hash(seed))
    if kind == "number":
        return _number(schema, (_hash(seed) % 800 + 100) / 1000)
    if kind == "boolean":
        return _hash(seed) % 2 == 0
    if kind == "null":
        return None
    return _string(schema, seed)


def _integer(schema: dict, h: int) -> int:
    low = high = None
    if "exclusiveMinimum" in schema:
        low = math.floor(schema["exclusiveMinimum"]) + 1
    elif "minimum" in schema:
        low = math.ceil(schema["minimum"])
    if "exclusiveMaximum" in schema:
        high = math.ceil(schema["exclusiveMaximum"]) - 1
    elif "maximum" in schema:
        high = math.floor(schema["maximum"])
    if low is not None and high is not None:
        return low + h % (high - low + 1)
    if low is not None:
        return low + h % 10
    if high is not None:
        return high - h % 10
    return h % 100


def _number(schema: dict, fraction: float) -> float:
    lows = [schema[k] for k in ("minimum", "exclusiveMinimum") if k in schema]
    highs = [schema[k] for k in ("maximum", "exclusiveMaximum") if k in schema]
    low, high = (max(lows) if lows else None), (min(highs) if highs else None)
    # fraction is within [0.1, 0.9): strictly inside the bounds, exclusive or not.
    if low is not None and high is not None:
        return low + (high - low) * fraction
    if low is not None:
        return low + 1 + fraction
    if high is not None:
        return high - 1 - fraction
    return round(fraction * 100, 2)


def _plain(h: int) -> str:
    return f"text-{h:012x}"[:17]


_FORMATS: dict[str, Callable[[int], str]] = {
    "date": lambda h: "2024-01-%02d" % (h % 28 + 1),
    "date-time": lambda h: "2024-01-%02dT12:00:00Z" % (h % 28 + 1),
    "time": lambda h: "12:00:00Z",
    "email": lambda h: f"user{h % 1000}@example.com",
    "uri": lambda h: f"https://example.com/{h % 1000}",
    "uuid": lambda h: str(uuid.UUID(int=h % (1 << 128))),
}


def _string(schema: dict, seed: str) -> str:
    h = _hash(seed)
    text = _FORMATS.get(schema.get("format"), _plain)(h)
    min_length, max_length = schema.get("minLength", 0), schema.get("maxLength")
    if len(text) < min_length:
        text += "x" * (min_length - len(text))
    if max_length is not None:
        text = text[:max_length]
    return text


def _resolve(root: Any, ref: str) -> Any:
    if not ref.startswith("#"):
        return {}
    node = root
    for part in ref.lstrip("#").strip("/").split("/"):
        if part:
            node = node.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(node, dict) else {}
    return node


def strict_schema(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return True
    properties = schema.get("properties")
    if schema.get("type") == "object" or properties is not None:
        if schema.get("additionalProperties") is not False or sorted(schema.get("required", [])) != sorted(properties or {}):
            return False
    parts = list((properties or {}).values()) + list((schema.get("$defs") or {}).values())
    parts += [schema["items"]] if isinstance(schema.get("items"), dict) else []
    parts += schema.get("anyOf") or []
    return all(strict_schema(part) for part in parts)


def _hash(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16)


def unit(text: str) -> float:
    return _hash(text) / float(1 << 64)


def error(message: str, code: str) -> dict:
    return {"error": {"message": message, "type": code, "code": code}}

