"""The config file: what loads, what is refused (and how it is explained), the fingerprint."""

from __future__ import annotations

import itertools
import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import PipelineConfig, config_from_json, load_config
from pipeline.errors import ConfigError

_module_ids = itertools.count()

GOOD = """\
name: reviews
num_records: 1000
row_group_size: 100
seed: 7
settings:
  max_in_flight_tasks: 64
models:
  writer:
    base_url: http://127.0.0.1:8000/v1
    model: some-model
    api_key_env: PIPELINE_TEST_KEY
columns:
  - {name: id, type: sampler, sampler: uuid}
  - {name: category, type: sampler, sampler: category, params: {values: [books, games, tools], weights: [1, 2, 1]}}
  - {name: stars, type: sampler, sampler: integer, params: {low: 1, high: 5}}
  - {name: when, type: sampler, sampler: datetime, params: {start: 2024-01-01, end: "2024-02-01T00:00:00"}}
  - name: review
    type: llm_text
    model: writer
    system_prompt: "You review {{ category }} products."
    prompt: "Write a {{ stars }}-star review. {% for i in range(2) %}{{ i }}{% endfor %}"
  - {name: title, type: expression, expr: "{{ category | upper }} ({{ stars }}*)", dtype: str}
  - name: words
    type: python
    function: "MODULE:count_words"
    requires: [review]
  - {name: people, type: seed_dataset, path: people.csv, columns: [first, last], order: shuffle}
"""


def unique_module(tmp_path: Path, source: str) -> str:
    # Each test gets its own module name: Python caches imported modules by name.
    name = f"cfgmod_{next(_module_ids)}_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def write_config(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def good(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PIPELINE_TEST_KEY", "sk-very-secret-value")
    module = unique_module(tmp_path, "def count_words(row):\n    return len(row['review'].split())\n")
    pd.DataFrame({"first": ["Ada", "Alan", "Grace"], "last": ["L", "T", "H"], "age": [36, 41, 85]}).to_csv(
        tmp_path / "people.csv", index=False
    )
    return write_config(tmp_path, GOOD.replace("MODULE", module))


def test_good_config_loads_with_outputs_in_config_order(good):
    config = load_config(good)
    assert config.output_columns() == ["id", "category", "stars", "when", "review", "title", "words", "first", "last"]
    assert config.base_dir == good.parent.resolve()
    assert config.source == str(good)
    assert config.settings.max_in_flight_tasks == 64
    assert config.settings.max_concurrent_row_groups == 3


def test_columns_expose_dependencies_strategy_and_statefulness(good):
    columns = {c.name: c for c in load_config(good).columns}
    # Template variables plus requires; loop variables and Jinja globals (range) are not columns.
    assert columns["review"].dependencies == ("category", "stars")
    assert columns["title"].dependencies == ("category", "stars")
    assert columns["words"].dependencies == ("review",)
    assert columns["id"].dependencies == ()
    assert {n: c.strategy for n, c in columns.items()} == {
        "id": "batch", "category": "batch", "stars": "batch", "when": "batch",
        "review": "cell", "title": "cell", "words": "cell", "people": "batch",
    }
    assert not any(c.stateful for c in columns.values())
    assert columns["people"].outputs == ("first", "last")


def test_sampler_params_are_stored_in_one_canonical_form(good):
    columns = {c.name: c for c in load_config(good).columns}
    assert columns["when"].params == {"start": "2024-01-01T00:00:00", "end": "2024-02-01T00:00:00"}
    assert columns["category"].params["weights"] == [1.0, 2.0, 1.0]


def test_python_generator_class_decides_strategy_and_adds_statefulness(tmp_path):
    module = unique_module(tmp_path, """
        from pipeline.generators.base import Generator

        class Counter(Generator):
            strategy = "batch"
            is_stateful = True

            def generate(self, df):
                return list(range(len(df)))
    """)
    path = write_config(tmp_path, f"""\
name: t
num_records: 10
columns:
  - {{name: n, type: python, function: "{module}:Counter"}}
""")
    (column,) = load_config(path).columns
    assert (column.strategy, column.stateful) == ("batch", True)
    assert config_from_json(load_config(path).to_json()).columns[0].strategy == "batch"


def test_python_mode_contradicting_its_generator_class_is_refused(tmp_path):
    module = unique_module(tmp_path, """
        from pipeline.generators.base import Generator

        class Cells(Generator):
            def generate(self, row):
                return 1
    """)
    path = write_config(tmp_path, f"""\
name: t
num_records: 10
columns:
  - {{name: n, type: python, mode: batch, function: "{module}:Cells"}}
""")
    with pytest.raises(ConfigError, match="remove 'mode'"):
        load_config(path)


HEAD = "name: t\nnum_records: 10\ncolumns:\n"
UUID = "  - {name: a, type: sampler, sampler: uuid}\n"

# (config text, column named in the message or None, words the message must contain)
BAD = {
    "unknown top key": ("name: t\nnum_records: 10\ncolour: red\ncolumns:\n" + UUID, None, ["unknown key 'colour'"]),
    "unknown column key": (HEAD + "  - {name: a, type: sampler, sampler: uuid, colour: red}\n", "a", ["unknown key 'colour'", "params"]),
    "unknown settings key": ("name: t\nnum_records: 10\nsettings: {lease: 3}\ncolumns:\n" + UUID, None, ["settings.lease", "lease_s"]),
    "unknown sampler param": (HEAD + "  - {name: a, type: sampler, sampler: integer, params: {low: 1, high: 2, step: 1}}\n", "a", ["params.step"]),
    "unknown column type": (HEAD + "  - {name: a, type: magic}\n", "a", ["unknown column type 'magic'", "sampler"]),
    "unknown sampler kind": (HEAD + "  - {name: a, type: sampler, sampler: poisson}\n", "a", ["sampler", "poisson"]),
    "missing type": (HEAD + "  - {name: a}\n", "a", ["missing required key 'type'"]),
    "missing column key": (HEAD + "  - {name: a, type: expression}\n", "a", ["missing required key 'expr'"]),
    "missing top key": ("name: t\ncolumns:\n" + UUID, None, ["missing required key 'num_records'"]),
    "missing sampler param": (HEAD + "  - {name: a, type: sampler, sampler: bernoulli}\n", "a", ["params.p"]),
    "missing columns": ("name: t\nnum_records: 3\ncolumns: []\n", None, ["columns"]),
    "duplicate names": (HEAD + UUID + "  - {name: a, type: expression, expr: x}\n", "a", ["already taken"]),
    "duplicate output of a multi-output entry": (
        HEAD + UUID + "  - {name: s, type: seed_dataset, path: seed.csv, columns: [x, a]}\n", "s", ["'a'", "already taken"]),
    "duplicate output within an entry": (
        HEAD + "  - {name: s, type: seed_dataset, path: seed.csv, columns: [x, x]}\n", "s", ["'x' twice"]),
    "entry name equal to another's output": (
        HEAD + "  - {name: s, type: seed_dataset, path: seed.csv, columns: [x]}\n  - {name: x, type: sampler, sampler: uuid}\n",
        "x", ["already taken"]),
    "bad column name": (HEAD + "  - {name: 1a, type: sampler, sampler: uuid}\n", "1a", ["letters, digits"]),
    "bad pipeline name": ("name: -t\nnum_records: 10\ncolumns:\n" + UUID, None, ["name", "letters, digits"]),
    "jinja syntax error in expr": (HEAD + "  - {name: a, type: expression, expr: '{{ b '}\n", "a", ["Jinja2 syntax error", "expr"]),
    "jinja syntax error in prompt": (
        "name: t\nnum_records: 1\nmodels: {w: {base_url: 'http://x', model: m}}\ncolumns:\n"
        "  - {name: a, type: llm_text, model: w, prompt: '{% if x %}'}\n", "a", ["Jinja2 syntax error", "prompt"]),
    "undefined model alias": (HEAD + "  - {name: a, type: llm_text, model: nope, prompt: hi}\n", "a", ["model 'nope'", "models:"]),
    "python module missing": (HEAD + "  - {name: a, type: python, function: 'no_such_module_xyz:f'}\n", "a", ["no_such_module_xyz", "cannot import"]),
    "python attribute missing": (HEAD + "  - {name: a, type: python, function: 'MODULE:nothere'}\n", "a", ["no attribute 'nothere'"]),
    "python module that fails on import": (HEAD + "  - {name: a, type: python, function: 'BROKEN:f'}\n", "a", ["ZeroDivisionError"]),
    "python function spec malformed": (HEAD + "  - {name: a, type: python, function: 'mymodule.f'}\n", "a", ["module:callable"]),
    "num_records zero": ("name: t\nnum_records: 0\ncolumns:\n" + UUID, None, ["num_records", "greater than 0"]),
    "negative row_group_size": ("name: t\nnum_records: 5\nrow_group_size: -3\ncolumns:\n" + UUID, None, ["row_group_size", "-3"]),
    "number given as text": ("name: t\nnum_records: '5'\ncolumns:\n" + UUID, None, ["num_records", "integer"]),
    "bad error rate": ("name: t\nnum_records: 5\nsettings: {shutdown_error_rate: 1.5}\ncolumns:\n" + UUID, None, ["shutdown_error_rate"]),
    "weights length mismatch": (
        HEAD + "  - {name: a, type: sampler, sampler: category, params: {values: [x, y], weights: [1]}}\n", "a", ["weights", "one weight per value"]),
    "negative weight": (
        HEAD + "  - {name: a, type: sampler, sampler: category, params: {values: [x, y], weights: [1, -1]}}\n", "a", ["weights", ">= 0"]),
    "empty category": (HEAD + "  - {name: a, type: sampler, sampler: category, params: {values: []}}\n", "a", ["values"]),
    "integer low above high": (HEAD + "  - {name: a, type: sampler, sampler: integer, params: {low: 5, high: 1}}\n", "a", ["low (5) must be <= high (1)"]),
    "uniform empty range": (HEAD + "  - {name: a, type: sampler, sampler: uniform, params: {low: 1, high: 1}}\n", "a", ["must be < high"]),
    "negative stddev": (HEAD + "  - {name: a, type: sampler, sampler: gaussian, params: {mean: 0, stddev: -1}}\n", "a", ["stddev"]),
    "probability above one": (HEAD + "  - {name: a, type: sampler, sampler: bernoulli, params: {p: 1.5}}\n", "a", ["params.p"]),
    "datetime end before start": (
        HEAD + "  - {name: a, type: sampler, sampler: datetime, params: {start: 2024-02-01, end: 2024-01-01}}\n", "a", ["must be before end"]),
    "datetime not a date": (HEAD + "  - {name: a, type: sampler, sampler: datetime, params: {start: soon, end: 2024-01-01}}\n", "a", ["'soon'", "ISO"]),
    "unset api key env": (
        "name: t\nnum_records: 1\nmodels: {w: {base_url: 'http://x', model: m, api_key_env: PIPELINE_TEST_UNSET_KEY}}\ncolumns:\n"
        "  - {name: a, type: llm_text, model: w, prompt: hi}\n", "a", ["PIPELINE_TEST_UNSET_KEY", "not set", "export"]),
    "seed file missing": (HEAD + "  - {name: s, type: seed_dataset, path: nofile.csv, columns: [x]}\n", "s", ["nofile.csv", "does not exist"]),
    "seed file lacks a column": (HEAD + "  - {name: s, type: seed_dataset, path: seed.csv, columns: [x, zz]}\n", "s", ["'zz'", "it has: x, a"]),
    "seed file of unknown format": (HEAD + "  - {name: s, type: seed_dataset, path: seed.xlsx, columns: [x]}\n", "s", ["unknown format"]),
    "invalid output schema": (
        "name: t\nnum_records: 1\nmodels: {w: {base_url: 'http://x', model: m}}\ncolumns:\n"
        "  - {name: a, type: llm_structured, model: w, prompt: hi, output_schema: {type: 12}}\n", "a", ["JSON Schema"]),
    # The answers' validator (jsonschema-rs) builds the schema when the config is loaded: what it
    # cannot use is refused here, not found out by every cell of a run.
    "output schema of an unknown draft": (
        "name: t\nnum_records: 1\nmodels: {w: {base_url: 'http://x', model: m}}\ncolumns:\n"
        "  - {name: a, type: llm_structured, model: w, prompt: hi, output_schema: {$schema: 'http://example.com/mine', type: object}}\n",
        "a", ["not a valid JSON Schema", "http://example.com/mine"]),
    "output schema with a $ref to a URL": (
        "name: t\nnum_records: 1\nmodels: {w: {base_url: 'http://x', model: m}}\ncolumns:\n"
        "  - {name: a, type: llm_structured, model: w, prompt: hi, output_schema: {$ref: 'http://127.0.0.1:9/s.json'}}\n",
        "a", ["not a valid JSON Schema", "http://127.0.0.1:9/s.json"]),
    "output schema with a broken regex": (
        "name: t\nnum_records: 1\nmodels: {w: {base_url: 'http://x', model: m}}\ncolumns:\n"
        "  - {name: a, type: llm_structured, model: w, prompt: hi, output_schema: {properties: {x: {type: string, pattern: '[a-'}}}}\n",
        "a", ["not a valid JSON Schema", "properties/x/pattern"]),
    "output schema holding .inf": (
        "name: t\nnum_records: 1\nmodels: {w: {base_url: 'http://x', model: m}}\ncolumns:\n"
        "  - {name: a, type: llm_structured, model: w, prompt: hi, output_schema: {type: number, maximum: .inf}}\n",
        "a", ["not a valid JSON Schema", ".inf or .nan"]),
    "empty rubric": (
        "name: t\nnum_records: 1\nmodels: {w: {base_url: 'http://x', model: m}}\ncolumns:\n"
        "  - {name: a, type: llm_judge, model: w, prompt: hi, rubric: {}}\n", "a", ["rubric"]),
    "column not a mapping": (HEAD + "  - just-text\n", "#1", ["mapping"]),
    "not a mapping at the top": ("- a\n- b\n", None, ["must be a mapping", "list"]),
    "empty file": ("", None, ["must be a mapping", "empty"]),
    "yaml syntax error": ("name: t\nnum_records: [1\n", None, ["YAML syntax error", "line"]),
    "key given twice": ("name: t\nname: u\nnum_records: 1\ncolumns:\n" + UUID, None, ["'name' appears twice"]),
    "base_dir in the file": ("name: t\nnum_records: 1\nbase_dir: /\ncolumns:\n" + UUID, None, ["unknown key 'base_dir'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_is_refused_naming_file_column_and_problem(case, tmp_path, monkeypatch):
    text, column, words = BAD[case]
    monkeypatch.delenv("PIPELINE_TEST_UNSET_KEY", raising=False)
    pd.DataFrame({"x": [1, 2], "a": [3, 4]}).to_csv(tmp_path / "seed.csv", index=False)
    (tmp_path / "seed.xlsx").write_bytes(b"not really")
    text = text.replace("MODULE", unique_module(tmp_path, "def f(row):\n    return 1\n"))
    text = text.replace("BROKEN", unique_module(tmp_path, "x = 1 / 0\n"))
    path = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    if column is not None:
        assert f"column '{column}'" in message
        assert caught.value.column == column
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_an_output_schema_with_yaml_keys_and_dates_is_taken_as_json_has_it(tmp_path):
    path = write_config(tmp_path, "name: t\nnum_records: 1\nmodels: {w: {base_url: 'http://x', model: m}}\ncolumns:\n"
                        "  - {name: a, type: llm_structured, model: w, prompt: hi, output_schema: "
                        "{type: object, properties: {2023: {type: number}}, examples: [{2023: 1}], default: 2024-05-01}}\n")
    assert load_config(path).columns[0].output_schema == {
        "type": "object", "properties": {"2023": {"type": "number"}}, "examples": [{"2023": 1}], "default": "2024-05-01"}


def test_multiple_problems_are_reported_together(tmp_path):
    path = write_config(tmp_path, HEAD + "  - {name: a, type: sampler, sampler: uuid, x: 1}\n  - {name: b, type: expression}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "column 'a': unknown key 'x'" in str(caught.value)
    assert "column 'b': missing required key 'expr'" in str(caught.value)


def test_missing_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="no such file") as caught:
        load_config(tmp_path / "absent.yaml")
    assert str(tmp_path / "absent.yaml") in str(caught.value)


def test_api_key_env_of_an_unused_model_need_not_be_set(tmp_path, monkeypatch):
    monkeypatch.delenv("PIPELINE_TEST_UNSET_KEY", raising=False)
    path = write_config(tmp_path, "name: t\nnum_records: 1\nmodels: {w: {base_url: 'http://x', model: m, "
                        "api_key_env: PIPELINE_TEST_UNSET_KEY}}\ncolumns:\n" + UUID)
    assert load_config(path).models["w"].api_key_env == "PIPELINE_TEST_UNSET_KEY"


def test_unknown_dependency_is_refused_naming_the_column(tmp_path):
    pytest.importorskip("pipeline.graph")
    path = write_config(tmp_path, HEAD + UUID + "  - {name: b, type: expression, expr: '{{ a }} {{ nope }}'}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value) and "column 'b'" in str(caught.value) and "'nope'" in str(caught.value)


def test_dependency_cycle_is_refused_naming_its_columns(tmp_path):
    pytest.importorskip("pipeline.graph")
    path = write_config(tmp_path, HEAD + UUID + "  - {name: b, type: expression, expr: '{{ c }}'}\n"
                        "  - {name: c, type: expression, expr: '{{ a }}', requires: [b]}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message and "cycle" in message and "b" in message and "c" in message


def test_a_column_may_read_one_defined_later_and_itself(tmp_path):
    path = write_config(tmp_path, HEAD + "  - {name: b, type: expression, expr: '{{ a }}'}\n" + UUID)
    assert load_config(path).output_columns() == ["b", "a"]


def test_fingerprint_is_stable_across_loads(good):
    assert load_config(good).fingerprint() == load_config(good).fingerprint()


def test_fingerprint_ignores_num_records_settings_and_secret_values(good, monkeypatch):
    before = load_config(good).fingerprint()
    monkeypatch.setenv("PIPELINE_TEST_KEY", "another-secret")
    text = good.read_text()
    good.write_text(text.replace("num_records: 1000", "num_records: 5").replace("max_in_flight_tasks: 64", "max_in_flight_tasks: 8"))
    config = load_config(good)
    assert config.fingerprint() == before
    assert config.with_num_records(77).fingerprint() == before
    assert "another-secret" not in config.to_json()


@pytest.mark.parametrize(
    "old, new",
    [
        ("seed: 7", "seed: 8"),
        ("row_group_size: 100", "row_group_size: 50"),
        ("{low: 1, high: 5}", "{low: 1, high: 6}"),
        ("model: some-model", "model: other-model"),
        ("order: shuffle", "order: sequential"),
    ],
)
def test_fingerprint_changes_with_what_decides_values(good, old, new):
    before = load_config(good).fingerprint()
    good.write_text(good.read_text().replace(old, new))
    assert load_config(good).fingerprint() != before


def test_fingerprint_changes_with_seed_file_and_python_module_contents(good):
    config = load_config(good)
    before = config.fingerprint()
    pd.DataFrame({"first": ["Ada"], "last": ["L"]}).to_csv(good.parent / "people.csv", index=False)
    after_seed = config.fingerprint()
    assert after_seed != before
    module = Path(config.base_dir) / f"{config.columns[6].function.split(':')[0]}.py"
    module.write_text(module.read_text() + "\n# changed\n")
    assert config.fingerprint() != after_seed


def test_to_json_round_trips_without_the_file(good, tmp_path, monkeypatch):
    config = load_config(good)
    text = config.to_json()
    assert "sk-very-secret-value" not in text
    assert json.loads(text)["base_dir"] == str(good.parent.resolve())
    monkeypatch.chdir(tmp_path.parent)
    again = config_from_json(text)
    assert again == config
    assert again.fingerprint() == config.fingerprint()
    assert again.output_columns() == config.output_columns()


def test_config_from_json_validates_again(good):
    data = json.loads(load_config(good).to_json())
    data["num_records"] = 0
    with pytest.raises(ConfigError, match="num_records"):
        config_from_json(json.dumps(data))
    with pytest.raises(ConfigError):
        config_from_json("[1, 2]")


def test_with_num_records_returns_a_copy(good):
    config = load_config(good)
    smaller = config.with_num_records(10)
    assert (smaller.num_records, config.num_records) == (10, 1000)
    assert isinstance(smaller, PipelineConfig) and smaller.columns == config.columns
    with pytest.raises(ConfigError):
        config.with_num_records(0)


def test_mapping_order_survives_the_stored_config_and_changes_the_fingerprint(tmp_path, monkeypatch):
    """A resumed run rebuilds prompts from the stored config: a rubric's order is part of them."""
    from pipeline.config import config_from_json, load_config

    def write(rubric_lines):
        path = tmp_path / "judge.yaml"
        path.write_text("name: j\nnum_records: 2\nmodels:\n  m: {base_url: 'http://127.0.0.1:9/v1', model: x}\n"
                        "columns:\n  - name: s\n    type: llm_judge\n    model: m\n    prompt: hi\n    rubric:\n"
                        + "".join(f"      {line}\n" for line in rubric_lines))
        return load_config(path)

    cfg = write(["zeta: last letter", "alpha: first letter"])
    again = config_from_json(cfg.to_json())
    assert list(again.columns[0].rubric) == ["zeta", "alpha"]
    assert again.fingerprint() == cfg.fingerprint()
    assert write(["alpha: first letter", "zeta: last letter"]).fingerprint() != cfg.fingerprint()
