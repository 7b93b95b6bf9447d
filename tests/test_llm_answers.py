"""The answer parser (pipeline.llm.answers), one row per answer shape.

Shapes come from issue 10 and from public bug reports of LLM clients (cited per row): reasoning
models' think blocks, fences with backticks inside, prose before and after the JSON, trailing
garbage, several fenced blocks. Each row: the answer text, then the value expected, or
``MALFORMED`` with a piece of the problem expected in the message.
"""

from __future__ import annotations

import json

import pytest

from pipeline.json_schemas import schema_json_form, schema_problem, schema_validator
from pipeline.llm.answers import MalformedAnswer, extract_json, text_problem

MALFORMED = object()
FENCE = "```"

# (id, answer text, expected value | (MALFORMED, words in the problem))
JSON_SHAPES = [
    # -- the whole text ----------------------------------------------------------------
    ("plain object", '{"a": 1}', {"a": 1}),
    ("plain object, whitespace around", '  \n{"a": 1}\n\t', {"a": 1}),
    ("plain array", "[1, 2]", [1, 2]),
    ("a string holding three backticks, unfenced", ' {"a": "```"} ', {"a": "```"}),
    ("a string holding <think>, unfenced (DeepTutor#675)", '{"x": "a <think>b</think> c"}',
     {"x": "a <think>b</think> c"}),
    ("raw newline inside a string (control character)", '{"a": "line one\nline two"}',
     {"a": "line one\nline two"}),
    ("inline backticks inside a string (dify#41958)", '{"code": "use `print` function"}',
     {"code": "use `print` function"}),
    # -- after a leading think block ---------------------------------------------------------
    ("think then JSON (issue 10; langchain#32120)", '<think>The user wants JSON.</think>{"a": 1}', {"a": 1}),
    ("think, newlines, then JSON", '<think>\nplan\n</think>\n\n{"a": 1}\n', {"a": 1}),
    ("think in capitals (bili-core#289)", '<THINK>plan</THINK>{"a": 1}', {"a": 1}),
    ("think holding a draft object (DeepTutor#675)", '<think>\nmaybe output {"draft": true}\n</think>\n{"title": "T"}',
     {"title": "T"}),
    ("think holding brackets, then fenced JSON (gbrain#2559)",
     '<think>Claims [1] and {2}.</think>\n\n```json\n[{"claim": "x"}]\n```', [{"claim": "x"}]),
    ("only a closing </think> (template opened it)", 'I should answer.\n</think>\n{"a": 1}', {"a": 1}),
    ("a lone </think> holding a draft before it", 'Maybe {"draft": 1}.\n</think>\n{"a": 1}', {"a": 1}),
    ("a lone </think> inside a JSON string amid prose", 'Here: {"a": "x </think> y"} done', {"a": "x </think> y"}),
    ("think then prose then JSON", '<think>ok</think>Sure! Here is the JSON: {"a": 1}', {"a": 1}),
    ("think, then tool_call tags around the JSON (langchain#40147)",
     '<think>x</think> <tool_call> {"a": 1} </tool_call>', {"a": 1}),
    ("unfinished think block", '<think>I will output {"draft": 1} once I', (MALFORMED, "unfinished <think>")),
    ("only a think block", "<think>all thoughts</think>\n", (MALFORMED, "only a <think> block")),
    # -- a fenced block ----------------------------------------------------------------
    ("json fence", '```json\n{"a": 1}\n```', {"a": 1}),
    ("plain fence with prose around", 'Here you go:\n```\n[1, 2]\n```\nEnjoy.', [1, 2]),
    ("JSON fence tag in capitals", '```JSON\n{"a": 1}\n```', {"a": 1}),
    ("fence opened after prose on its line", 'Here it is: ```json\n{"a": 1}\n```', {"a": 1}),
    ("three backticks inside a fenced string (issue 10)", '```json\n{"command": "run ```make``` first"}\n```',
     {"command": "run ```make``` first"}),
    ("```json inside a fenced string (hindsight#2563)", '```json\n{"facts": [{"what": "uses ```json fences"}]}\n```',
     {"facts": [{"what": "uses ```json fences"}]}),
    ("four-backtick fence around three (guardrails#1549)", '````json\n{"answer": "Use ```\nfences"}\n````',
     {"answer": "Use ```\nfences"}),
    ("CRLF line ends (ouroboros#1734)", '```json\r\n{"a": 1}\r\n```\r\n', {"a": 1}),
    ("indented closing fence", '```json\n  {"a": 1}\n  ```', {"a": 1}),
    ("unclosed fence (answer ends inside it)", '```json\n{"a": 1}\n', {"a": 1}),
    ("two fenced blocks: the first that parses (easy-dataset#507)", '```json\n{"a": 1}\n```\nor\n```json\n{"a": 2}\n```',
     {"a": 1}),
    ("a bash fence before the JSON (NeMo labs-OO-Agents#238)", 'Run:\n```bash\nmake {all}\n```\nResult:\n{"ok": true}',
     {"ok": True}),
    ("empty fence (hindsight#2542)", "```json\n```", (MALFORMED, "fenced block is empty")),
    ("fence whose JSON has a trailing comma: not repaired (mem0#5623)", '```json\n{"a": 1,}\n```',
     (MALFORMED, "not valid JSON")),
    # -- the first complete JSON value amid prose --------------------------------------
    ("prose before (issue 10)", 'Sure! Here is the JSON: {"a": 1}', {"a": 1}),
    ("prose after (issue 10)", '{"a": 1}\nLet me know if you need anything else!', {"a": 1}),
    ("prose before and after", 'Here:\n{"a": {"b": [1, 2]}}\nHope this helps.', {"a": {"b": [1, 2]}}),
    ("trailing garbage after the object (reyn#1057; SuggestArr#266)", '{"a": 1}}\n```', {"a": 1}),
    ("unmatched closing brace in the prose after (langchain4j#5406)", 'Result {"a": 1} done }', {"a": 1}),
    ("inline backticks in the prose before (dify#41958)", 'Here is `the` result: {"a": 1}', {"a": 1}),
    ("one-line fence, no newline", '```json {"a": 1}```', {"a": 1}),
    ("a JSON string value amid prose is not taken", 'The answer is "yes" and {"a": 1}', {"a": 1}),
    # -- malformed ---------------------------------------------------------------------
    ("empty", "", (MALFORMED, "empty")),
    ("whitespace only", " \n\t ", (MALFORMED, "whitespace")),
    ("prose only", "I cannot help with that.", (MALFORMED, "no JSON object or array")),
    ("cut mid-object", '{"a": 1, "b": "unfini', (MALFORMED, "not valid JSON")),
    ("trailing comma, unfenced", '{"a": 1,}', (MALFORMED, "not valid JSON")),
]


@pytest.mark.parametrize(("text", "expected"), [row[1:] for row in JSON_SHAPES], ids=[row[0] for row in JSON_SHAPES])
def test_structured_answer_shapes(text, expected):
    if isinstance(expected, tuple) and expected[0] is MALFORMED:
        with pytest.raises(MalformedAnswer, match=expected[1]):
            extract_json(text)
    else:
        assert extract_json(text) == expected


def wants_object_with_a(value):
    return None if isinstance(value, dict) and "a" in value else "it does not match the schema"


# (id, answer text, expected value | (MALFORMED, words)) with a check that wants {"a": ...}
CHECKED_SHAPES = [
    ("a citation [1] in the prose before the object", 'See [1] for details: {"a": 1}', {"a": 1}),
    ("a first fenced block of the wrong shape, a second of the right one", '```json\n[1]\n```\n```json\n{"a": 2}\n```',
     {"a": 2}),
    ("a whole text of the wrong shape: the checker's problem is reported", '{"b": 1}',
     (MALFORMED, "does not match the schema")),
    ("a nested object of the right shape is not the answer", '{"b": {"a": 1}}',
     (MALFORMED, "does not match the schema")),
    ("nor in prose", 'Here: {"b": {"a": 1}} and that is all.', (MALFORMED, "does not match the schema")),
    ("a second top-level value in prose is", 'Here: {"b": {"a": 1}} or rather {"a": 2}', {"a": 2}),
]


@pytest.mark.parametrize(("text", "expected"), [row[1:] for row in CHECKED_SHAPES], ids=[row[0] for row in CHECKED_SHAPES])
def test_a_value_the_schema_refuses_does_not_hide_the_next_one(text, expected):
    if isinstance(expected, tuple) and expected[0] is MALFORMED:
        with pytest.raises(MalformedAnswer, match=expected[1]):
            extract_json(text, wants_object_with_a)
    else:
        assert extract_json(text, wants_object_with_a) == expected


NESTED = {"type": "object", "required": ["a", "b"],
          "properties": {"a": {"type": "object", "properties": {"c": {"type": "integer"}}}, "b": {"type": "string"}}}


def test_the_schema_problem_quoted_back_is_the_one_nearest_the_root():
    validator = schema_validator(NESTED)
    assert schema_problem(validator, {"a": {"c": 1}, "b": "x"}) is None
    # two problems: "b" missing at the root, a wrong type at a/c; the model is told the first
    assert schema_problem(validator, {"a": {"c": "one"}}) == \
        'it does not match the schema at (root): "b" is a required property'
    assert schema_problem(validator, {"a": {"c": "one"}, "b": "x"}) == \
        'it does not match the schema at a/c: "one" is not of type "integer"'


def test_answers_meet_the_specifications_regular_expressions_and_no_format_assertion():
    # ECMA 262 (JSON Schema's dialect), not Python's re: "$" does not match before a final
    # newline, "\d" is an ASCII digit. The pure-Python jsonschema accepted both answers.
    digits = schema_validator({"type": "string", "pattern": "^\\d+$"})
    assert schema_problem(digits, "123") is None
    assert schema_problem(digits, "123\n") is not None
    assert schema_problem(digits, "\u0661\u0662") is not None
    # "format" is an annotation, as before, also in a draft-07 schema
    email = schema_validator({"$schema": "http://json-schema.org/draft-07/schema#", "format": "email"})
    assert schema_problem(email, "not an address") is None


def test_a_lone_surrogate_in_an_answer_is_judged_as_it_is_stored():
    # json.loads makes a lone surrogate of a "\\ud83d" escape; the value is stored with U+FFFD
    schema = {"type": "object", "properties": {"s": {"const": "a\ufffd"}, "t": {"maxLength": 1}}}
    validator = schema_validator(schema)
    assert schema_problem(validator, json.loads('{"s": "a\\ud83d"}')) is None
    assert schema_problem(validator, json.loads('{"t": "\\ud83dxx"}')).startswith("it does not match the schema at t:")
    # a schema given as JSON may hold one too (a config file cannot)
    assert schema_problem(schema_validator({"const": "\ud83d"}), json.loads('"\\ud83d"')) is None


def test_an_answer_the_parser_or_the_validator_cannot_take_is_malformed_not_an_error():
    # each is re-asked like any malformed answer, never a cell failed by an exception
    deep = '{"a": ' * 300 + "1" + "}" * 300  # json.loads reads it; the validator cannot describe it
    assert schema_problem(schema_validator({"type": "object", "required": ["b"]}), json.loads(deep)) == \
        "it does not match the schema"
    with pytest.raises(MalformedAnswer, match="nested too deeply"):
        extract_json("[" * 100_000 + "]" * 100_000)
    with pytest.raises(MalformedAnswer, match="too many digits"):
        extract_json('{"a": ' + "1" * 5000 + "}")
    with pytest.raises(MalformedAnswer):  # the same in prose (step 4)
        extract_json("Here: [" + "1" * 5000 + "] and " + "[" * 100_000 + "]" * 100_000)


def test_a_value_around_a_non_json_number_is_malformed_not_replaced_by_one_inside_it():
    wants_dict = lambda v: None if isinstance(v, dict) else "not an object"  # noqa: E731
    for text in ['{"stats": {"mean": 1.5}, "ratio": NaN}', 'Here: {"stats": {"mean": 1.5}, "ratio": NaN} ok',
                 '{"stats": {"mean": 1.5}, "ratio": 1e400}', '{"stats": {"mean": 1.5}, "n": ' + "9" * 5000 + "}"]:
        with pytest.raises(MalformedAnswer, match="NaN|too large|too many digits"):
            extract_json(text, wants_dict)
    with pytest.raises(MalformedAnswer, match="nested too deeply"):  # not the arrays inside it either
        extract_json("Here: " + "[" * 1200 + "]" * 1200)


def test_a_lone_surrogate_deep_in_an_answer_is_a_problem_not_an_error():
    validator = schema_validator({"properties": {"s": {"pattern": "^a"}}})
    value = json.loads('{"s": "\\ud83d", "d": ' + "[" * 600 + "]" * 600 + "}")
    assert "nested too deeply" in schema_problem(validator, value)


def test_a_schema_is_taken_in_its_json_form():
    # a YAML file gives int keys and dates; JSON (and the server) has text
    assert schema_json_form({"properties": {2023: {"type": "number"}}, "examples": [__import__("datetime").date(2024, 5, 1)]}) \
        == {"properties": {"2023": {"type": "number"}}, "examples": ["2024-05-01"]}
    with pytest.raises(ValueError, match=r"\.inf or \.nan"):
        schema_json_form({"maximum": float("inf")})
    # as the stored config of a run has it (pydantic's JSON form): an unchanged file keeps its fingerprint
    utc = __import__("datetime").timezone.utc
    assert schema_json_form({"examples": [__import__("datetime").datetime(2024, 1, 15, 10, tzinfo=utc)]}) \
        == {"examples": ["2024-01-15T10:00:00Z"]}


@pytest.mark.parametrize(("schema", "words"), [
    ({"$schema": "http://json-schema.org/draft-03/schema#"}, ["unknown $schema", "draft-03", "2020-12"]),
    ({"pattern": "a\\Z"}, ["ECMA 262", "(at pattern)"]),
    ({"pattern": "[a-"}, ['"[a-" is not a "regex" (at pattern)']),  # a typo: no word on dialects
    ({"type": "nope"}, ["nope", "(at type)"]),
    ({"$ref": "#/$defs/missing"}, ["/$defs/missing"]),
    ({"$ref": "http://127.0.0.1:9/s.json"}, ["http://127.0.0.1:9/s.json"]),  # refused, never fetched
])
def test_a_schema_the_validator_cannot_use_is_a_value_error_naming_the_problem(schema, words):
    with pytest.raises(ValueError) as caught:
        schema_validator(schema)
    for word in words:
        assert word in str(caught.value)


# (id, text, reasoning_chars, problem words or None)
TEXT_SHAPES = [
    ("text", "Hello.", 0, None),
    ("text with spaces around", "  Hello.  ", 0, None),
    ("a single character", "x", 0, None),
    ("empty", "", 0, "empty"),
    ("whitespace only", " \n ", 0, "whitespace"),
    ("empty, the answer in reasoning_content (LM Studio; issue 10)", "", 120, "reasoning"),
]


@pytest.mark.parametrize(("text", "reasoning", "problem"), [row[1:] for row in TEXT_SHAPES],
                         ids=[row[0] for row in TEXT_SHAPES])
def test_text_answer_shapes(text, reasoning, problem):
    found = text_problem(text, reasoning_chars=reasoning)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_a_long_answer_full_of_brackets_is_scanned_in_bounded_time():
    text = "[x " * 50_000 + '{"a": 1}'
    with pytest.raises(MalformedAnswer):  # the object lies past the bound of starts tried
        extract_json(text)
    assert extract_json("[x " * 50 + '{"a": 1}') == {"a": 1}
