"""Templates cannot hang or exhaust the process (issue 14, items 8 and 12).

A template that loops for ever, or builds a value of gigabytes, fails its own cell with an error
naming the column and the bound, and the run goes on; while templates run, the event loop stays
free, so SIGINT stops the run at once. Prompts of llm_* columns have the same bounds.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sqlite3
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.sandbox import MAX_STEPS, TemplateLimitError
from pipeline.templates import arender, compile_template, render
from tests.conftest import cli, cli_popen, fake_server_module

NESTED_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HUGE_STRING = "{{ 'a' * 3000000000 }}"


# -- the bounds, one by one -------------------------------------------------------------------
@pytest.mark.parametrize("text, bound", [
    (NESTED_LOOP, "steps"),
    ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}", "steps"),
    (HUGE_STRING, "the limit is 10,000,000"),
    ("{{ [1, 2] * 10 ** 8 }}", "the limit is 10,000,000"),
    ("{{ 7 ** 10000000 }}", "bits"),
    ("{{ 10 ** 40000 * 10 ** 40000 }}", "bits"),
    ("{{ 'a'|center(10 ** 9) }}", "center"),
    ("{{ 'a'.ljust(10 ** 9) }}", "the limit"),
    ("{{ '{:>999999999}'.format(1) }}", "format()"),
    ("{{ '%999999999d' % 1 }}", "'%'"),
    ("{{ '%999999999d'|format(1) }}", "'%'"),
    ("{{ range(100000)|join('x' * 1000000) }}", "join"),
    ("{{ ('a' * 100000)|replace('a', 'b' * 1000) }}", "replace"),
    ("{{ lipsum(10 ** 6) }}", "lipsum"),
    ("{{ [[1]]|sum(start=[]) }}", "sum only adds numbers"),
    ("{% set ns = namespace(s='a' * 1000000) %}{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}"
     "{% endfor %}{{ ns.s }}", "'~'"),
    ("{% set ns = namespace(s='a' * 1000000) %}{% for i in range(30) %}{% set ns.s = ns.s + ns.s %}"
     "{% endfor %}{{ ns.s }}", "'+'"),
    ("{% set b = 'a' * 1000000 %}{% for i in range(100000) %}{{ b }}{% endfor %}", "output"),
    ("{% set b = 'a' * 1000000 %}{% set x %}{% for i in range(100000) %}{{ b }}{% endfor %}{% endset %}",
     "output"),
])
def test_a_template_past_a_bound_raises_a_template_limit_error_naming_it(text, bound):
    with pytest.raises(TemplateLimitError, match=re.escape(bound)):
        render(compile_template(text), {}, timeout_s=10)


def test_a_render_past_its_time_limit_fails_naming_render_timeout_s():
    slow = "{% for i in range(100000) %}{% set x = [5, 3, 1]|sort %}{% endfor %}"
    with pytest.raises(TemplateLimitError, match="render_timeout_s = 0.001 s"):
        render(compile_template(slow), {}, timeout_s=0.001)


@pytest.mark.parametrize("text, data, expected", [
    ("{{ a }}:{{ b|upper }}", {"a": 1, "b": "x"}, "1:X"),
    ("{% for i in range(3) %}{{ loop.index }}/{{ loop.length }} {% endfor %}", {}, "1/3 2/3 3/3 "),
    ("{% for x in xs|sort if x > 1 %}{{ x }}{% else %}none{% endfor %}", {"xs": [3, 1, 2]}, "23"),
    ("{% for x in t recursive %}{{ x.n }}{% if x.c %}[{{ loop(x.c) }}]{% endif %}{% endfor %}",
     {"t": [{"n": 1, "c": [{"n": 2, "c": []}]}]}, "1[2]"),
    ("{{ 'ab' * 3 }} {{ 2 ** 100 }} {{ [1] + [2] }} {{ '%05.1f' % 3 }} {{ 'x{}'.format(4) }}", {},
     "ababab 1267650600228229401496703205376 [1, 2] 003.0 x4"),
    ("{{ range(5)|join(',') }} {{ '-'.join(['a', 'b']) }} {{ 'a'|center(5) }}|{{ [1, 2]|sum }}", {},
     "0,1,2,3,4 a-b   a  |3"),
    ("{% macro f(n) %}{{ n ~ '!' }}{% endmacro %}{% set s %}{{ f(1) }}{{ f(2) }}{% endset %}{{ s }}", {}, "1!2!"),
    ("{% for i in range(990) %}{% for j in range(990) %}{% endfor %}{% endfor %}done", {}, "done"),
])
def test_ordinary_templates_render_as_before(text, data, expected):
    assert render(compile_template(text), data, timeout_s=10) == expected


async def test_a_slow_render_leaves_the_event_loop_free():
    # Within every bound, but ~1 s of work: arender moves it off the loop after a few ms.
    slow = compile_template("{% for i in range(800) %}{% for j in range(800) %}{% endfor %}{% endfor %}ok")
    beats = 0

    async def heartbeat() -> None:
        nonlocal beats
        while True:
            await asyncio.sleep(0.005)
            beats += 1

    beating = asyncio.create_task(heartbeat())
    try:
        assert await arender(slow, {}, timeout_s=10) == "ok"
    finally:
        beating.cancel()
    assert beats >= 3, "the loop was held while the template rendered"


async def test_a_cancelled_render_stops_its_thread():
    # Within the step budget, but minutes of work: each step sorts 100,000 numbers.
    endless = compile_template("{% set big = range(100000)|list %}{% for i in range(99999) %}"
                               "{% set x = big|sort %}{% endfor %}")
    task = asyncio.create_task(arender(endless, {}, timeout_s=60))
    await asyncio.sleep(0.05)  # it has left the loop for a thread by now
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The default executor shuts down only when its threads are done: the render has stopped.
    await asyncio.wait_for(asyncio.get_running_loop().shutdown_default_executor(), timeout=10)


# -- through the command line -----------------------------------------------------------------
def write_config(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.slow
def test_templates_past_a_bound_fail_only_their_cells_and_the_run_completes(tmp_path):
    url, stop = fake_server_module().start_server()
    try:
        cfg = write_config(tmp_path / "p", f"""\
            name: bounded
            num_records: 40
            row_group_size: 20
            seed: 5
            settings: {{shutdown_error_rate: 0.9}}
            models:
              m: {{base_url: "{url}", model: m-model}}
            columns:
              - {{name: n, type: sampler, sampler: integer, params: {{low: 0, high: 9}}}}
              - name: loop
                type: expression
                expr: "{{% if n == 0 %}}{NESTED_LOOP}{{% endif %}}ok"
              - name: big
                type: expression
                expr: "{{% if n == 1 %}}{HUGE_STRING}{{% endif %}}{{{{ n }}}}"
              - name: ask
                type: llm_text
                model: m
                prompt: "{{% if n == 2 %}}{HUGE_STRING}{{% endif %}}Tell me about {{{{ n }}}}"
            """)
        home = tmp_path / "home"
        proc = cli("run", str(cfg), "--run-id", "bounded", "--quiet", home=home, timeout=90)
        assert proc.returncode == 0, proc.stderr

        out = tmp_path / "out.jsonl"
        cli("export", "bounded", "--output", str(out), "--format", "jsonl", home=home, check=True)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        failed = json.loads(cli("sql", "select column_name, last_error from tasks where state = 'failed'",
                                "--json", home=home, check=True).stdout)
    finally:
        stop()
    assert rows and all(r["n"] not in (0, 1, 2) and r["loop"] == "ok" and r["big"] == str(r["n"]) for r in rows)
    by_column: dict[str, list[str]] = {}
    for task in failed:
        by_column.setdefault(task["column_name"], []).append(task["last_error"])
    assert set(by_column) == {"loop", "big", "ask"}, failed
    assert len(rows) + sum(map(len, by_column.values())) == 40, "every other record was written"
    assert all("column 'loop'" in e and f"{MAX_STEPS:,} steps" in e for e in by_column["loop"])
    assert all("column 'big'" in e and "the limit is 10,000,000" in e for e in by_column["big"])
    assert all("column 'ask': prompt:" in e and "the limit is 10,000,000" in e for e in by_column["ask"])


@pytest.mark.slow
def test_sigint_stops_a_run_whose_templates_loop_for_ever(tmp_path):
    cfg = write_config(tmp_path / "p", f"""\
        name: endless
        num_records: 400
        row_group_size: 100
        settings: {{shutdown_error_window: 1000000, max_in_flight_tasks: 4}}
        columns:
          - {{name: n, type: sampler, sampler: integer, params: {{low: 0, high: 9}}}}
          - {{name: loop, type: expression, expr: "{NESTED_LOOP}{{{{ n }}}}"}}
        """)
    home = tmp_path / "home"
    proc = cli_popen("run", str(cfg), "--run-id", "endless", "--quiet", home=home)
    try:
        deadline = time.monotonic() + 60
        while not _failed_tasks(home / "state.db"):  # templates are being rendered and failing
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "no cell ever finished: the run is stuck in a template"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 30
        while proc.poll() is None:
            assert time.monotonic() < deadline, "SIGINT was not answered"
            time.sleep(0.05)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    status = json.loads(cli("status", "endless", "--json", home=home, check=True).stdout)
    assert status["status"] == "interrupted"


def _failed_tasks(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("select count(*) from tasks where state = 'failed'").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:  # the store is being created
        return 0
