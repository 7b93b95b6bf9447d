"""The README's value table, row by row, through the real command line: a python column returns
the row's value; the run goes once uninterrupted and once killed after its first row group is
checkpointed (and the second one's values recorded) and resumed. Both runs must export the
same bytes in CSV and JSONL, the same Parquet table and the same load_dataset frame, and those
must hold what the table says. Values with no exact stored form fail their own cell only."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import decimal
import json
import math
import signal
import sqlite3
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import pandas as pd
import pyarrow.parquet as pq
import pytest

import pipeline
from pipeline.config import config_from_json
from pipeline.llm import LlmRuntime
from pipeline.generators.llm import make_llm_generator
from tests.conftest import built_once, cli, cli_env, cli_popen, fake_server_module

N, RG = 12, 4
D = decimal.Decimal
PARIS_JAN, MINUS_5 = dt.timezone(dt.timedelta(hours=1)), dt.timezone(dt.timedelta(hours=-5))
BIG = "x" * 10_000_000 + "!"


class Row(NamedTuple):
    """One row of the table. ``produce``: Python source of the value of record ``i``.
    ``exact(i)``: the value the store keeps and gives back (load_dataset for object columns).
    ``jsonl(i)``: json.loads of its JSONL field; ``csv(i)``: its CSV text; ``arrow``: the
    Parquet export's type; ``parquet(i)``: its Parquet value; ``load(i)``: load_dataset's value
    when it is not ``exact(i)`` (pandas' own types for native columns)."""

    name: str
    produce: str
    exact: Callable[[int], Any]
    jsonl: Callable[[int], Any]
    csv: Callable[[int], str]
    arrow: str
    parquet: Callable[[int], Any]
    load: Callable[[int], Any] | None = None


def _tz(i: int) -> dt.datetime:
    return (dt.datetime(2024, 1, 1, 12, tzinfo=PARIS_JAN) if i % 2 else
            dt.datetime(2024, 6, 1, 12, tzinfo=MINUS_5)) + dt.timedelta(days=i)


def _f32(i: int) -> float:
    import numpy as np
    return float(np.float32(i) / np.float32(3))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


DECIMALS = [D("1.10"), D("-0.001"), D("1E+3")]
PARQUET_DECIMALS = [D("1.100"), D("-0.001"), D("1000.000")]
NAN, INF = float("nan"), float("inf")

TABLE = [
    Row("nan", "float('nan') if i % 2 else i + 0.5", lambda i: NAN if i % 2 else i + 0.5,
        lambda i: None if i % 2 else i + 0.5, lambda i: "" if i % 2 else repr(i + 0.5),
        "double", lambda i: NAN if i % 2 else i + 0.5),
    Row("inf", "float('inf') if i % 2 else i + 0.5", lambda i: INF if i % 2 else i + 0.5,
        lambda i: None if i % 2 else i + 0.5, lambda i: "inf" if i % 2 else repr(i + 0.5),
        "double", lambda i: INF if i % 2 else i + 0.5),
    Row("neg_inf", "-float('inf') if i % 2 else i + 0.5", lambda i: -INF if i % 2 else i + 0.5,
        lambda i: None if i % 2 else i + 0.5, lambda i: "-inf" if i % 2 else repr(i + 0.5),
        "double", lambda i: -INF if i % 2 else i + 0.5),
    Row("raw_bytes", "b'\\x00\\xff' + bytes([i])", lambda i: b"\x00\xff" + bytes([i]),
        lambda i: _b64(b"\x00\xff" + bytes([i])), lambda i: _b64(b"\x00\xff" + bytes([i])),
        "binary", lambda i: b"\x00\xff" + bytes([i])),
    Row("dec", "[D('1.10'), D('-0.001'), D('1E+3')][i % 3]", lambda i: DECIMALS[i % 3],
        lambda i: DECIMALS[i % 3], lambda i: str(DECIMALS[i % 3]),
        "decimal128(7, 3)", lambda i: PARQUET_DECIMALS[i % 3]),
    Row("np_int64", "np.int64(i) * 10**12", lambda i: i * 10**12, lambda i: i * 10**12,
        lambda i: str(i * 10**12), "int64", lambda i: i * 10**12),
    Row("np_float32", "np.float32(i) / np.float32(3)", _f32, _f32, lambda i: repr(_f32(i)),
        "double", _f32),
    Row("np_bool", "np.bool_(i % 2 == 0)", lambda i: i % 2 == 0, lambda i: i % 2 == 0,
        lambda i: str(i % 2 == 0), "bool", lambda i: i % 2 == 0),
    Row("np_array", "np.arange(3) * i", lambda i: [0, i, 2 * i], lambda i: [0, i, 2 * i],
        lambda i: f"[0, {i}, {2 * i}]", "list<element: int64>", lambda i: [0, i, 2 * i]),
    Row("np_array_f32", "np.array([0.1, i], dtype=np.float32)", lambda i: [0.10000000149011612, float(i)],
        lambda i: [0.10000000149011612, float(i)], lambda i: f"[0.10000000149011612, {float(i)!r}]",
        "list<element: double>", lambda i: [0.10000000149011612, float(i)]),
    Row("tz_datetime", "(dt.datetime(2024, 1, 1, 12, tzinfo=ZoneInfo('Europe/Paris')) if i % 2 else "
        "dt.datetime(2024, 6, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=-5)))) + dt.timedelta(days=i)",
        _tz, lambda i: _tz(i).isoformat(), lambda i: _tz(i).isoformat(),
        "timestamp[us, tz=UTC]", lambda i: _tz(i).astimezone(dt.timezone.utc)),
    Row("naive_datetime", "dt.datetime(2024, 1, 1, 12, 0, 0, 123456) + dt.timedelta(hours=i)",
        lambda i: dt.datetime(2024, 1, 1, 12 + i, 0, 0, 123456),
        lambda i: f"2024-01-01T{12 + i}:00:00.123456", lambda i: f"2024-01-01T{12 + i}:00:00.123456",
        "timestamp[us]", lambda i: dt.datetime(2024, 1, 1, 12 + i, 0, 0, 123456),
        load=lambda i: pd.Timestamp(2024, 1, 1, 12 + i, 0, 0, 123456)),
    Row("date", "dt.date(2024, 2, 28) + dt.timedelta(days=i)", lambda i: dt.date(2024, 2, 28) + dt.timedelta(days=i),
        lambda i: (dt.date(2024, 2, 28) + dt.timedelta(days=i)).isoformat(),
        lambda i: (dt.date(2024, 2, 28) + dt.timedelta(days=i)).isoformat(),
        "date32[day]", lambda i: dt.date(2024, 2, 28) + dt.timedelta(days=i)),
    Row("duration", "dt.timedelta(days=i, microseconds=7)", lambda i: dt.timedelta(days=i, microseconds=7),
        lambda i: i * 86400 + 7e-6, lambda i: repr(i * 86400 + 7e-6), "duration[us]",
        lambda i: dt.timedelta(days=i, microseconds=7), load=lambda i: pd.Timedelta(days=i, microseconds=7)),
    Row("a_set", "{'b', 'a', str(i)}", lambda i: sorted({"a", "b", str(i)}), lambda i: sorted({"a", "b", str(i)}),
        lambda i: json.dumps(sorted({"a", "b", str(i)})), "list<element: string>", lambda i: sorted({"a", "b", str(i)})),
    Row("a_tuple", "(i, 'x', (1.5, None))", lambda i: [i, "x", [1.5, None]], lambda i: [i, "x", [1.5, None]],
        lambda i: f'[{i}, "x", [1.5, null]]', "string", lambda i: f'[{i}, "x", [1.5, null]]'),
    Row("tag_bytes", "{'$bytes': 'aGVsbG8='}", lambda i: {"$bytes": "aGVsbG8="}, lambda i: {"$bytes": "aGVsbG8="},
        lambda i: '{"$bytes": "aGVsbG8="}', "struct<$bytes: string>", lambda i: {"$bytes": "aGVsbG8="}),
    Row("tag_date", "{'$date': '2024-01-01T00:00:00Z'}", lambda i: {"$date": "2024-01-01T00:00:00Z"},
        lambda i: {"$date": "2024-01-01T00:00:00Z"}, lambda i: '{"$date": "2024-01-01T00:00:00Z"}',
        "struct<$date: string>", lambda i: {"$date": "2024-01-01T00:00:00Z"}),
    Row("big_text", "BIG if i == 5 else 'short'", lambda i: BIG if i == 5 else "short",
        lambda i: BIG if i == 5 else "short", lambda i: BIG if i == 5 else "short", "string",
        lambda i: BIG if i == 5 else "short"),
    Row("int_none", "None if i % 3 == 0 else i", lambda i: None if i % 3 == 0 else i,
        lambda i: None if i % 3 == 0 else i, lambda i: "" if i % 3 == 0 else str(i), "int64",
        lambda i: None if i % 3 == 0 else i),
]

#: Values with no exact stored form: (column, record, what the error says). Each column
#: returns "ok" for every other record. ``bad_batch`` is a batch column.
REFUSED = [
    ("bad_custom", 2, "Custom() if i == 2 else 'ok'",
     "column 'bad_custom', record 2 (row group 0, row 2): a value_fns.Custom has no stored form"),
    ("bad_surrogate", 6, "'half an emoji: \\ud83d' if i == 6 else 'ok'",
     "column 'bad_surrogate', record 6 (row group 1, row 2): text is not valid Unicode: "
     "lone surrogate '\\ud83d' at position 15"),
    ("bad_keys", 9, "{1: 'a', '1': 'b'} if i == 9 else 'ok'",
     "column 'bad_keys', record 9 (row group 2, row 1): dict keys must be strings: key 1 is of type int"),
]
BAD_BATCH = ("bad_batch", 10, "column 'bad_batch', record 10 (row group 2, row 2): "
             "text is not valid Unicode: lone surrogate '\\udc00' at position 0 (at ['k'])")
DROPPED = {2, 6, 9, 10}
LIVE = [i for i in range(N) if i not in DROPPED]
CELLS = [row.name for row in TABLE] + [name for name, *_ in REFUSED]


def module_source() -> str:
    lines = [
        "import asyncio, datetime as dt, os, pathlib",
        "from decimal import Decimal as D",
        "from zoneinfo import ZoneInfo",
        "import numpy as np",
        "",
        "BIG = 'x' * 10_000_000 + '!'",
        "",
        "class Custom:",
        "    pass",
        "",
        "def idx(df):",
        "    return list(df.index)",
        "",
        "def tags(df):",
        "    return [{'$dt': str(i)} for i in df['i']]",
        "",
        "def bad_batch(df):",
        "    return [{'k': '\\udc00'} if i == 10 else 'ok' for i in df['i']]",
        "",
        "async def gate(row):",
        "    # Records after the first row group wait for a file: the test kills the run there.",
        "    path = pathlib.Path(os.environ['VALUES_GATE'])",
        "    if row['i'] >= 4 and not path.exists():",
        "        while not path.exists():",
        "            await asyncio.sleep(0.01)",
        "    return 0",
        "",
    ]
    for name, produce in [(row.name, row.produce) for row in TABLE] + [(n, p) for n, _, p, _ in REFUSED]:
        lines += [f"def {name}(row):", "    i = row['i']", f"    return {produce}", ""]
    return "\n".join(lines)


def write_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "value_fns.py").write_text(module_source())
    columns = ["  - {name: i, type: python, function: 'value_fns:idx', mode: batch}"]
    columns += [f"  - {{name: {name}, type: python, function: 'value_fns:{name}', requires: [i]}}" for name in CELLS]
    columns += ["  - {name: tags, type: python, function: 'value_fns:tags', mode: batch, requires: [i]}",
                "  - {name: bad_batch, type: python, function: 'value_fns:bad_batch', mode: batch, requires: [i]}",
                f"  - {{name: gate, type: python, function: 'value_fns:gate', requires: [i, tags, bad_batch, "
                f"{', '.join(CELLS)}]}}"]
    cfg = folder / "cfg.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: values
        num_records: {N}
        row_group_size: {RG}
        settings: {{max_concurrent_row_groups: 1}}
        columns:
        """) + "\n".join(columns) + "\n")
    return cfg


def store_count(home: Path, sql: str) -> int:
    db = home / "state.db"
    if not db.exists():
        return -1
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
        try:
            return conn.execute(sql).fetchone()[0]
        except sqlite3.OperationalError:  # the tables are being created
            return -1


def kill_after_first_row_group(cfg: Path, home: Path, gate: Path) -> subprocess.CompletedProcess:
    """Run 'killed' until row group 0 is checkpointed and every value of row group 1 is
    recorded (its gate cells wait), SIGKILL it, open the gate and resume."""
    env = cli_env(VALUES_GATE=str(gate))
    proc = cli_popen("run", str(cfg), "--run-id", "killed", "--quiet", home=home, env=env)
    # Cells of records 4, 5 and 7 (record 6 is refused), the three batch tasks and record 6's failure.
    want = len(CELLS) * 3
    deadline = time.monotonic() + 60
    try:
        while True:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "row group 1 was never recorded"
            checkpointed = store_count(home, "select count(*) from row_groups where run_id = 'killed' "
                                             "and row_group = 0 and state = 'checkpointed'")
            cells = store_count(home, "select count(*) from tasks where run_id = 'killed' and row_group = 1 "
                                      "and state = 'done' and column_name != 'gate' and row_index in (0, 1, 3)")
            batches = store_count(home, "select count(*) from tasks where run_id = 'killed' and row_group = 1 "
                                        "and state = 'done' and row_index is null")
            failed = store_count(home, "select count(*) from tasks where run_id = 'killed' and row_group = 1 "
                                       "and state = 'failed' and row_index = 2")
            if checkpointed == 1 and cells == want and batches == 3 and failed == 1:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    gate.touch()
    return cli("resume", "killed", "--quiet", home=home, env=env)


def make_runs(base: Path) -> None:
    """Both runs, their exports in every format and their stderr (stderr.json), in ``base``."""
    home, gate = base / "home", base / "gate"
    cfg = write_config(base / "cfg")
    stderr = {}
    gate.touch()
    done = cli("run", str(cfg), "--run-id", "whole", "--quiet", home=home, env=cli_env(VALUES_GATE=str(gate)))
    assert done.returncode == 0, done.stderr
    stderr["whole"] = done.stderr
    gate.unlink()
    resumed = kill_after_first_row_group(cfg, home, gate)
    assert resumed.returncode == 0, resumed.stderr
    stderr["killed"] = resumed.stderr
    for run_id in ("whole", "killed"):
        for fmt in ("parquet", "csv", "jsonl"):
            cli("export", run_id, "--output", str(base / f"{run_id}.{fmt}"), "--format", fmt, home=home, check=True)
    (base / "stderr.json").write_text(json.dumps(stderr))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    base = built_once(tmp_path_factory, "value-table", make_runs)
    home = base / "home"
    out = {"home": home, "base": base, "stderr": json.loads((base / "stderr.json").read_text())}
    for run_id in ("whole", "killed"):
        for fmt in ("parquet", "csv", "jsonl"):
            out[(run_id, fmt)] = base / f"{run_id}.{fmt}"
        out[(run_id, "frame")] = pipeline.load_dataset(run_id, home=home)
    return out


def same(a: Any, b: Any) -> bool:
    """Equal with the same types, recursively; NaN equals NaN; datetimes with the same offset."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (dt.datetime, dt.time)):
        return a == b and a.utcoffset() == b.utcoffset()
    if isinstance(a, decimal.Decimal):
        return str(a) == str(b)
    return a == b


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 200 else text[:200] + "..."


@pytest.mark.slow
def test_a_killed_and_resumed_run_exports_what_the_uninterrupted_run_exports(runs):
    for fmt in ("csv", "jsonl"):
        assert runs[("whole", fmt)].read_bytes() == runs[("killed", fmt)].read_bytes(), fmt
    whole, killed = pq.read_table(runs[("whole", "parquet")]), pq.read_table(runs[("killed", "parquet")])
    assert whole.schema == killed.schema
    assert same(whole.to_pylist(), killed.to_pylist())
    pd.testing.assert_frame_equal(runs[("whole", "frame")], runs[("killed", "frame")])
    assert runs[("whole", "frame")]["i"].tolist() == LIVE
    # A batch column's values shaped like the store's tags come back as the plain dicts they are.
    assert runs[("whole", "frame")]["tags"].tolist() == [{"$dt": str(i)} for i in LIVE]


@pytest.mark.parametrize("row", TABLE, ids=[row.name for row in TABLE])
@pytest.mark.slow
def test_each_value_comes_back_as_the_table_says_in_every_format(runs, row):
    records = [json.loads(line, parse_float=D if row.name == "dec" else float)
               for line in runs[("whole", "jsonl")].read_text(encoding="utf-8").splitlines()]
    with open(runs[("whole", "csv")], newline="", encoding="utf-8") as f:
        csv.field_size_limit(20_000_000)
        texts = [r[row.name] for r in csv.DictReader(f)]
    parquet = pq.read_table(runs[("whole", "parquet")]).column(row.name)
    frame = runs[("whole", "frame")][row.name].tolist()
    assert str(parquet.type) == row.arrow
    parquet = parquet.to_pylist()
    for k, i in enumerate(LIVE):
        assert same(records[k][row.name], row.jsonl(i)), f"jsonl {i}: {shown(records[k][row.name])}"
        assert texts[k] == row.csv(i), f"csv {i}: {shown(texts[k])}"
        assert same(parquet[k], row.parquet(i)), f"parquet {i}: {shown(parquet[k])}"
        expected = (row.load or row.exact)(i)
        assert same(frame[k], expected) or (row.load is not None and frame[k] == expected), \
            f"load_dataset {i}: {shown(frame[k])}"


@pytest.mark.slow
def test_decimals_keep_their_exact_digits_in_jsonl(runs):
    text = runs[("whole", "jsonl")].read_text(encoding="utf-8")
    for i in LIVE:
        assert f'"dec": {DECIMALS[i % 3]},' in text


@pytest.mark.parametrize("column, record, message", [(c, r, m) for c, r, _, m in REFUSED] + [BAD_BATCH],
                         ids=[c for c, *_ in REFUSED] + ["bad_batch"])
@pytest.mark.slow
def test_a_value_with_no_stored_form_fails_its_own_cell_only(runs, column, record, message):
    for run_id in ("whole", "killed"):
        rows = json.loads(cli("sql", "select column_name, row_group, row_index, last_error from tasks "
                                     f"where run_id = '{run_id}' and state = 'failed'", "--json",
                              home=runs["home"], check=True).stdout)
        assert len(rows) == len(DROPPED), rows
        (failure,) = [r for r in rows if r["row_group"] * RG + r["row_index"] == record]
        assert failure["column_name"] == column
        assert failure["last_error"].startswith(f"UnstorableValueError: {message}"), failure["last_error"]
        assert record not in runs[(run_id, "frame")]["i"].tolist()
    assert message in runs["stderr"]["whole"]


# -- text from LLM answers ------------------------------------------------------------------

@pytest.fixture
def fake_server():
    url, stop = fake_server_module().start_server(latency_ms=1)
    yield url
    stop()


@pytest.mark.slow
def test_an_llm_answer_holding_a_lone_surrogate_is_stored_with_a_replacement_character(tmp_path, fake_server):
    """The fake server echoes the prompt; a "\\ud83d" escape in its JSON body is a lone surrogate
    once parsed. The run completes with every record, the text holding U+FFFD instead."""
    folder = tmp_path / "llm"
    folder.mkdir()
    cfg = folder / "cfg.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: surrogates
        num_records: 6
        row_group_size: 3
        models:
          writer: {{base_url: "{fake_server}", model: m}}
        columns:
          - {{name: n, type: sampler, sampler: integer, params: {{low: 0, high: 9}}}}
          - name: text
            type: llm_text
            model: writer
            prompt: 'Say {{{{ "\\ud83d" }}}} {{{{ n }}}} now'
        """))
    home = tmp_path / "home"
    done = cli("run", str(cfg), "--run-id", "llm", "--quiet", home=home)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "llm.jsonl"
    cli("export", "llm", "--output", str(out), "--format", "jsonl", home=home, check=True)
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 6
    for row in rows:
        assert row["text"].endswith(f" Say \ufffd {row['n']} now"), row["text"]


async def test_strings_inside_a_structured_answer_are_made_valid_unicode(tmp_path, fake_server):
    """The schema's first choice is a const holding a lone surrogate, which the fake server
    answers as a "\\ud83d" escape: the parsed value holds U+FFFD, keys included."""
    # A config file cannot hold a lone surrogate (refused, exit 2): the schema comes as JSON.
    config = config_from_json(json.dumps({
        "name": "structured", "num_records": 1, "models": {"writer": {"base_url": fake_server, "model": "m"}},
        "columns": [{"name": "facts", "type": "llm_structured", "model": "writer", "prompt": "Facts.",
                     "output_schema": {"type": "object", "required": ["half", "nested"], "properties": {
                         "half": {"anyOf": [{"const": "an emoji: \ud83d"}, {"type": "string"}]},
                         "nested": {"anyOf": [{"const": {"k\udc00": ["\ud83dx"]}}, {"type": "object"}]}}}}],
        "base_dir": str(tmp_path)}))
    runtime = LlmRuntime(config.models)
    try:
        value = await make_llm_generator(config.columns[0], config, runtime=runtime).agenerate({})
    finally:
        await runtime.aclose()
    assert value == {"half": "an emoji: \ufffd", "nested": {"k\ufffd": ["\ufffdx"]}}
