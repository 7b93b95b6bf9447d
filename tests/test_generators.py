"""Built-in generators: samplers, expressions, python functions and classes, seed datasets."""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError, GenerationError
from pipeline.generators import Generator, build_generators, llm_runtime

_module_ids = itertools.count()

SAMPLERS = """\
  - {name: cat, type: sampler, sampler: category, params: {values: [a, b, c], weights: [1, 2, 7]}}
  - {name: mixed, type: sampler, sampler: category, params: {values: [1, x, 2.5, null]}}
  - {name: int, type: sampler, sampler: integer, params: {low: -3, high: 3}}
  - {name: big, type: sampler, sampler: integer, params: {low: -9223372036854775808, high: 9223372036854775807}}
  - {name: uni, type: sampler, sampler: uniform, params: {low: 10.0, high: 20.0}}
  - {name: gauss, type: sampler, sampler: gaussian, params: {mean: 5.0, stddev: 2.0}}
  - {name: coin, type: sampler, sampler: bernoulli, params: {p: 0.3}}
  - {name: id, type: sampler, sampler: uuid}
  - {name: when, type: sampler, sampler: datetime, params: {start: 2024-01-01, end: "2024-01-02T00:00:00"}}
  - {name: when_tz, type: sampler, sampler: datetime, params: {start: "2024-01-01T00:00:00+02:00", end: "2024-01-01T01:00:00+02:00"}}
"""
SAMPLER_NAMES = ["cat", "mixed", "int", "big", "uni", "gauss", "coin", "id", "when", "when_tz"]


def unique_module(tmp_path: Path, source: str) -> str:
    name = f"genmod_{next(_module_ids)}_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    return name


def make_generators(tmp_path: Path, columns: str, *, seed: int = 0, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(f"name: t\nnum_records: 1000\nseed: {seed}\ncolumns:\n{columns}")
    config = load_config(path)
    return build_generators(config), config


def produce(generator: Generator, index) -> list:
    values = generator.generate(pd.DataFrame(index=pd.Index(list(index), dtype="int64")))
    return list(values)


def test_build_generators_keys_entries_in_config_order_with_outputs(tmp_path):
    generators, config = make_generators(tmp_path, SAMPLERS)
    assert list(generators) == SAMPLER_NAMES
    for name, generator in generators.items():
        assert generator.outputs == (name,)
        assert generator.strategy == "batch" and not generator.is_stateful


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_sampler_values_depend_only_on_record_index(tmp_path, name):
    generators, _ = make_generators(tmp_path, SAMPLERS)
    generator = generators[name]
    whole = produce(generator, range(1000))
    halves = produce(generator, range(500)) + produce(generator, range(500, 1000))
    order = np.random.default_rng(1).permutation(1000)
    shuffled = dict(zip(order.tolist(), produce(generator, order)))
    assert whole == halves
    assert whole == [shuffled[i] for i in range(1000)]
    assert produce(generator, [7, 123456789012]) == [whole[7], produce(generator, [123456789012])[0]]


def test_sampler_values_differ_between_columns_and_seeds(tmp_path):
    columns = ("  - {name: a, type: sampler, sampler: uniform, params: {low: 0.0, high: 1.0}}\n"
               "  - {name: b, type: sampler, sampler: uniform, params: {low: 0.0, high: 1.0}}\n")
    seed0, _ = make_generators(tmp_path, columns, seed=0, name="s0.yaml")
    seed1, _ = make_generators(tmp_path, columns, seed=1, name="s1.yaml")
    a0, b0, a1 = produce(seed0["a"], range(100)), produce(seed0["b"], range(100)), produce(seed1["a"], range(100))
    assert a0 != b0 and a0 != a1
    assert abs(np.corrcoef(a0, b0)[0, 1]) < 0.3


def test_samplers_respect_bounds_and_weights(tmp_path):
    generators, _ = make_generators(tmp_path, SAMPLERS)
    n = 20_000
    index = range(n)
    cat = pd.Series(produce(generators["cat"], index)).value_counts(normalize=True)
    assert abs(cat["a"] - 0.1) < 0.02 and abs(cat["b"] - 0.2) < 0.02 and abs(cat["c"] - 0.7) < 0.02
    assert set(produce(generators["mixed"], range(200))) == {1, "x", 2.5, None}
    ints = produce(generators["int"], index)
    assert set(ints) == set(range(-3, 4)) and all(type(v) in (int, np.int64) for v in ints[:5])
    big = np.asarray(produce(generators["big"], range(1000)))
    assert big.min() < -(2**62) and big.max() > 2**62
    uni = np.asarray(produce(generators["uni"], index))
    assert uni.min() >= 10.0 and uni.max() < 20.0 and abs(uni.mean() - 15.0) < 0.1
    gauss = np.asarray(produce(generators["gauss"], index))
    assert abs(gauss.mean() - 5.0) < 0.06 and abs(gauss.std() - 2.0) < 0.06
    coin = produce(generators["coin"], index)
    assert {bool(v) for v in coin} == {True, False} and abs(np.mean(coin) - 0.3) < 0.015


def test_uuid_sampler_gives_distinct_version_4_uuids(tmp_path):
    generators, _ = make_generators(tmp_path, SAMPLERS)
    ids = produce(generators["id"], range(5000))
    parsed = [uuid.UUID(v) for v in ids]
    assert all(str(u) == v for u, v in zip(parsed, ids))
    assert all(u.version == 4 and u.variant == uuid.RFC_4122 for u in parsed)
    assert len(set(ids)) == len(ids)


def test_datetime_sampler_gives_whole_seconds_within_range(tmp_path):
    generators, _ = make_generators(tmp_path, SAMPLERS)
    when = produce(generators["when"], range(2000))
    assert all(type(v) is dt.datetime for v in when)
    assert all(dt.datetime(2024, 1, 1) <= v < dt.datetime(2024, 1, 2) and v.microsecond == 0 for v in when)
    assert max(when) - min(when) > dt.timedelta(hours=20)
    aware = produce(generators["when_tz"], range(200))
    tz = dt.timezone(dt.timedelta(hours=2))
    assert all(v.utcoffset() == tz.utcoffset(None) for v in aware)
    assert all(dt.datetime(2024, 1, 1, tzinfo=tz) <= v < dt.datetime(2024, 1, 1, 1, tzinfo=tz) for v in aware)


async def test_builtin_generators_answer_on_the_loop(tmp_path):
    generators, _ = make_generators(tmp_path, SAMPLERS)
    df = pd.DataFrame(index=pd.RangeIndex(3))
    assert generators["int"].is_async
    assert list(await generators["int"].agenerate(df)) == produce(generators["int"], range(3))


EXPRESSIONS = """\
  - {name: s, type: expression, expr: "{{ word | upper }}-{{ n }}"}
  - {name: i, type: expression, expr: "{{ n * 2 }}", dtype: int}
  - {name: f, type: expression, expr: "{{ n / 4 }}", dtype: float}
  - {name: b, type: expression, expr: "{{ n > 1 }}", dtype: bool}
  - {name: b1, type: expression, expr: " {{ 1 if n else 0 }} ", dtype: bool}
  - {name: j, type: expression, expr: '{"word": {{ word | tojson }}, "tags": {{ tags | tojson }}}', dtype: json}
  - {name: n, type: sampler, sampler: integer, params: {low: 1, high: 3}}
  - {name: word, type: sampler, sampler: category, params: {values: [x]}}
  - {name: tags, type: sampler, sampler: category, params: {values: [[a, "<b>"]]}}
"""


def test_expression_renders_and_casts_by_dtype(tmp_path):
    generators, _ = make_generators(tmp_path, EXPRESSIONS)
    row = {"n": 3, "word": "héllo", "tags": ["a", "<b>"]}
    assert generators["s"].generate(row) == "HÉLLO-3"
    assert generators["i"].generate(row) == 6
    assert generators["f"].generate(row) == 0.75
    assert generators["b"].generate(row) is True
    assert generators["b1"].generate({**row, "n": 0}) is False
    assert generators["j"].generate(row) == {"word": "héllo", "tags": ["a", "<b>"]}
    assert generators["i"].strategy == "cell" and generators["i"].outputs == ("i",)


@pytest.mark.parametrize(
    "expr, dtype, row, words",
    [
        ("{{ n }}", "str", {}, "'n' is undefined"),
        ("{{ n.nothing }}", "str", {"n": 1}, "has no attribute"),
        ("{{ n }}", "int", {"n": "seven"}, "not a valid int"),
        ("{{ n }}", "bool", {"n": "maybe"}, "not a valid bool"),
        ("{{ n }}", "json", {"n": "{oops"}, "not a valid json"),
        ("{{ n.__class__.__mro__ }}", "str", {"n": 1}, "failed"),
    ],
)
def test_expression_failures_raise_generation_error(tmp_path, expr, dtype, row, words):
    text = f"  - {{name: e, type: expression, expr: '{expr}', dtype: {dtype}}}\n  - {{name: n, type: sampler, sampler: uuid}}\n"
    generators, _ = make_generators(tmp_path, text)
    with pytest.raises(GenerationError, match=words):
        generators["e"].generate(row)


PY_FUNCTIONS = """
import threading
import pandas as pd

seen = {}

def shout(row):
    seen["shout"] = threading.current_thread()
    return row["word"].upper()

def lengths(df):
    return df["word"].str.len().tolist()

def split(row):
    return {"first": row["word"][0], "rest": row["word"][1:]}

async def ashout(row):
    seen["ashout"] = threading.current_thread()
    return row["word"].upper() + "!"

async def alengths(df):
    seen["alengths"] = threading.current_thread()
    return pd.Series([len(w) for w in df["word"]], index=df.index)
"""


def python_columns(module: str) -> str:
    return (f"  - {{name: word, type: sampler, sampler: category, params: {{values: [x]}}}}\n"
            f"  - {{name: up, type: python, function: '{module}:shout', requires: [word]}}\n"
            f"  - {{name: lens, type: python, function: '{module}:lengths', mode: batch, requires: [word], stateful: true}}\n"
            f"  - {{name: parts, type: python, function: '{module}:split', outputs: [first, rest], requires: [word]}}\n"
            f"  - {{name: aup, type: python, function: '{module}:ashout', requires: [word]}}\n"
            f"  - {{name: alens, type: python, function: '{module}:alengths', mode: batch, requires: [word]}}\n")


async def test_python_functions_are_wrapped_by_mode_and_kind(tmp_path):
    module = unique_module(tmp_path, PY_FUNCTIONS)
    generators, _ = make_generators(tmp_path, python_columns(module))
    up, lens, parts, aup, alens = (generators[n] for n in ("up", "lens", "parts", "aup", "alens"))
    assert (up.strategy, up.is_stateful, up.is_async) == ("cell", False, False)
    assert (lens.strategy, lens.is_stateful, lens.is_async) == ("batch", True, False)
    assert (aup.strategy, aup.is_async, alens.strategy, alens.is_async) == ("cell", True, "batch", True)
    assert parts.outputs == ("first", "rest")
    df = pd.DataFrame({"word": ["ab", "cde"]}, index=[10, 11])
    assert up.generate({"word": "ab"}) == "AB"
    assert lens.generate(df) == [2, 3]
    assert parts.generate({"word": "abc"}) == {"first": "a", "rest": "bc"}
    assert await aup.agenerate({"word": "ab"}) == "AB!"
    assert (await alens.agenerate(df)).tolist() == [2, 3]


async def test_async_python_function_runs_on_the_loop_thread_and_sync_one_does_not(tmp_path):
    module = unique_module(tmp_path, PY_FUNCTIONS)
    generators, _ = make_generators(tmp_path, python_columns(module))
    seen = sys.modules[module].seen
    await generators["aup"].agenerate({"word": "x"})
    assert seen["ashout"] is threading.current_thread()
    await generators["up"].agenerate({"word": "x"})  # the base class bridges it to a thread
    assert seen["shout"] is not threading.current_thread()


GENERATOR_CLASSES = """
from pipeline import generators

class Numbered(generators.Generator):
    strategy = "batch"
    instances = 0

    def __init__(self):
        type(self).instances += 1

    def generate(self, df):
        return [f"{self.outputs[0]}-{i}" for i in df.index]

class Remembering(generators.Generator):
    async def agenerate(self, row):
        return row["word"] * 2
"""


async def test_python_generator_subclass_is_created_once_with_its_outputs(tmp_path):
    module = unique_module(tmp_path, GENERATOR_CLASSES)
    text = (f"  - {{name: word, type: sampler, sampler: uuid}}\n"
            f"  - {{name: num, type: python, function: '{module}:Numbered'}}\n"
            f"  - {{name: twice, type: python, function: '{module}:Remembering', stateful: true, requires: [word]}}\n")
    generators, config = make_generators(tmp_path, text)
    cls = sys.modules[module].Numbered
    num, twice = generators["num"], generators["twice"]
    assert isinstance(num, cls) and cls.instances == 1
    assert (num.strategy, num.is_stateful, num.outputs) == ("batch", False, ("num",))
    assert (twice.strategy, twice.is_stateful, twice.is_async) == ("cell", True, True)
    assert type(twice).is_stateful is False  # the config's flag is set on the instance only
    assert num.generate(pd.DataFrame(index=[4, 5])) == ["num-4", "num-5"]
    assert await twice.agenerate({"word": "ab"}) == "abab"
    assert {c.name: c.strategy for c in config.columns}["num"] == "batch"


def write_seed(tmp_path: Path, fmt: str, n: int = 5) -> str:
    df = pd.DataFrame({"k": list(range(n)), "word": [f"w{i}" for i in range(n)], "extra": [0.5] * n})
    path = tmp_path / f"seed.{fmt}"
    if fmt == "parquet":
        df.to_parquet(path)
    elif fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.to_json(path, orient="records", lines=True)
    return path.name


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_seed_dataset_sequential_wraps_around(tmp_path, fmt):
    file = write_seed(tmp_path, fmt)
    generators, _ = make_generators(tmp_path, f"  - {{name: seed, type: seed_dataset, path: {file}, columns: [word, k]}}\n")
    generator = generators["seed"]
    assert generator.outputs == ("word", "k") and generator.strategy == "batch"
    out = generator.generate(pd.DataFrame(index=[3, 4, 5, 6, 12]))
    assert list(out.columns) == ["word", "k"]
    assert out.index.tolist() == [3, 4, 5, 6, 12]
    assert out["word"].tolist() == ["w3", "w4", "w0", "w1", "w2"]
    assert out["k"].tolist() == [3, 4, 0, 1, 2]


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_seed_dataset_shuffle_is_a_fixed_permutation_per_pass(tmp_path, fmt):
    file = write_seed(tmp_path, fmt, n=50)
    text = f"  - {{name: seed, type: seed_dataset, path: {file}, columns: [k], order: shuffle}}\n"
    first, _ = make_generators(tmp_path, text, name="a.yaml")
    again, _ = make_generators(tmp_path, text, name="b.yaml")
    other, _ = make_generators(tmp_path, text, seed=1, name="c.yaml")

    def ks(gens, index):
        return gens["seed"].generate(pd.DataFrame(index=list(index)))["k"].tolist()

    one_pass = ks(first, range(50))
    assert sorted(one_pass) == list(range(50)) and one_pass != list(range(50))
    assert ks(first, range(50, 100)) == one_pass
    assert ks(first, range(100)) == ks(first, range(60)) + ks(first, range(60, 100))
    assert ks(again, range(100)) == ks(first, range(100))
    assert ks(other, range(50)) != one_pass


def test_llm_columns_refuse_to_build_without_the_llm_module(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("name: t\nnum_records: 1\nmodels: {w: {base_url: 'http://x', model: m}}\ncolumns:\n"
                    "  - {name: a, type: llm_text, model: w, prompt: hi}\n")
    config = load_config(path)
    monkeypatch.setitem(sys.modules, "pipeline.generators.llm", None)
    with pytest.raises(ConfigError, match="llm columns are not available") as caught:
        build_generators(config, runtime=llm_runtime(config))
    assert caught.value.column == "a"
    monkeypatch.setitem(sys.modules, "pipeline.llm", None)
    with pytest.raises(ConfigError, match="llm columns are not available") as caught:
        llm_runtime(config)
    assert caught.value.column == "a"


def test_llm_columns_need_the_runtime_their_owner_made(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("name: t\nnum_records: 1\nmodels: {w: {base_url: 'http://x', model: m}}\ncolumns:\n"
                    "  - {name: a, type: llm_text, model: w, prompt: hi}\n"
                    "  - {name: b, type: llm_text, model: w, prompt: ho}\n")
    config = load_config(path)
    with pytest.raises(ValueError, match="runtime"):
        build_generators(config)
    runtime = llm_runtime(config)
    generators = build_generators(config, runtime=runtime)
    assert generators["a"].runtime is generators["b"].runtime is runtime
    assert generators["a"].limit is generators["b"].limit  # one model: one limit


@pytest.mark.slow
def test_a_run_without_llm_columns_never_imports_the_llm_layer(tmp_path):
    """The job makes an LLM runtime only for llm_* columns: pipeline.llm and aiohttp stay out."""
    import subprocess

    from tests.conftest import ROOT, cli_env

    path = tmp_path / "config.yaml"
    path.write_text(f"name: t\nnum_records: 20\ncolumns:\n{SAMPLERS}"
                    "  - {name: label, type: expression, expr: '{{ cat }}-{{ int }}'}\n")
    probe = textwrap.dedent(f"""
        import sys, pipeline
        result = pipeline.run({str(path)!r}, home={str(tmp_path / "home")!r})
        assert result.status == "complete", result
        print(sorted(m for m in ("pipeline.llm", "pipeline.generators.llm", "aiohttp") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=cli_env(), cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)


def test_build_generators_can_run_in_a_fresh_event_loop(tmp_path):
    # build_generators is sync and must not need a running loop (the CLI calls it first).
    generators, _ = make_generators(tmp_path, SAMPLERS)
    assert asyncio.run(generators["coin"].agenerate(pd.DataFrame(index=[0]))).shape == (1,)


@pytest.mark.slow
def test_a_user_generator_with_reads_indexes_is_given_record_indexes(tmp_path):
    """A batch Generator that sets ``reads_indexes`` gets its row group's live record indexes
    (numpy int64) instead of a DataFrame, across row groups (README's RecordNumbers)."""
    (tmp_path / "ri_mod.py").write_text(textwrap.dedent("""\
        import numpy, pipeline

        class RecordNumbers(pipeline.Generator):
            strategy = "batch"
            reads_indexes = True

            def generate(self, indexes):
                assert isinstance(indexes, numpy.ndarray) and indexes.dtype == numpy.int64, type(indexes)
                return indexes * 10
        """))
    (tmp_path / "ri.yaml").write_text(textwrap.dedent("""\
        name: ri
        num_records: 25
        row_group_size: 10
        columns:
          - {name: n, type: python, function: 'ri_mod:RecordNumbers'}
        """))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for args in (["run", "ri.yaml", "--run-id", "a", "--quiet"], ["export", "a", "--output", "out.jsonl"]):
        done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, "--home", "home"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["n"] for r in rows] == [i * 10 for i in range(25)]
