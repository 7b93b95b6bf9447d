"""`pipeline report` draws a traced run from its task_traces rows: a valid picture (PNG, SVG,
HTML), JSON series equal to the recorded traces, every invocation of a killed and resumed run,
429s of a model marked, and a clear refusal for a run that was not traced."""

from __future__ import annotations

import collections
import json
import signal
import struct
import time

import pytest

from tests.conftest import cli, cli_env, cli_popen, logged_pipeline
from tests.test_failures import llm_config


def sql_rows(query: str, home) -> list[dict]:
    return json.loads(cli("sql", query, "--json", home=home, check=True).stdout)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", data[:16]
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_a_killed_and_resumed_traced_run_gives_a_picture_and_series_equal_to_its_traces(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=800, rg=50, in_flight=8)  # 1,600 cells of 50 ms, 8 at a time
    home = tmp_path / "home"
    env = cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls"), PIPELINE_TEST_SLEEP="0.05")
    first = cli_popen("run", str(cfg), "--run-id", "tr", "--trace", "--quiet", "--no-check-models", home=home, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:  # some traces written and some row group finished: then the kill
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "the run never got going"
            if (home / "state.db").exists():
                got = cli("sql", "select count(*) as n from task_traces", "--json", home=home)
                done = cli("sql", "select count(*) as n from row_groups where state = 'checkpointed'", "--json",
                           home=home)
                if got.returncode == 0 and done.returncode == 0 and json.loads(got.stdout)[0]["n"] > 0 \
                        and json.loads(done.stdout)[0]["n"] > 0:
                    break
            time.sleep(0.1)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    resumed = cli("resume", "tr", "--trace", "--quiet", home=home, env=env)
    assert resumed.returncode == 0 and "already complete" not in resumed.stderr, resumed.stderr

    out = tmp_path / "report.png"
    made = cli("report", "tr", "--output", str(out), home=home)
    assert made.returncode == 0, made.stderr
    width, height = png_size(out.read_bytes())
    assert 600 <= width <= 3000 and 300 <= height <= 3000, (width, height)
    assert 10_000 < out.stat().st_size < 5_000_000

    series_file = tmp_path / "series.json"
    cli("report", "tr", "--output", str(series_file), "--format", "json", home=home, check=True)
    series = json.loads(series_file.read_text())
    traces = sql_rows("select * from task_traces where run_id = 'tr'", home)
    assert len({t["worker"] for t in traces}) == 2
    assert [i["worker"] for i in series["invocations"]] == sorted({t["worker"] for t in traces},
                                                                   key=lambda w: min(t["dispatched_at"] for t in traces if t["worker"] == w))
    recorded = collections.Counter((t["column_name"], t["outcome"], t["worker"]) for t in traces)
    drawn = collections.Counter((column, outcome, worker) for column, bars in series["lanes"].items()
                                for _start, _end, outcome, worker in bars)
    assert drawn == recorded
    t0 = series["t0"]
    recorded_ends = sorted(t["finished_at"] - t0 for t in traces)
    drawn_ends = sorted(end for bars in series["lanes"].values() for _s, end, _o, _w in bars)
    assert len(recorded_ends) == len(drawn_ends)
    assert max(abs(a - b) for a, b in zip(recorded_ends, drawn_ends)) < 1e-5
    # Every record completes once. A kill loses the traces of its last second (written once a
    # second), so records finished just before it may lack a trace: at most all 800.
    assert 0 < series["records"][-1][1] <= 800
    assert all(a[0] <= b[0] for a, b in zip(series["records"], series["records"][1:]))


@pytest.mark.slow
def test_429s_of_a_model_are_marked_and_svg_and_html_are_written(tmp_path, fake_server):
    url = fake_server(latency_ms=1)
    cfg = llm_config(tmp_path, url, records=20, settings=", trace: true",
                     prompt="[[status:429]][[status-attempts:1]][[retry-after-ms:10]] item {{ id }}")
    home = tmp_path / "home"
    cli("run", str(cfg), "--run-id", "llm", "--quiet", home=home, check=True)  # traced by settings.trace
    series_file = tmp_path / "s.json"
    cli("report", "llm", "-o", str(series_file), "--format", "json", home=home, check=True)
    series = json.loads(series_file.read_text())
    assert len(series["rate_limited"]["writer"]) == 20  # one 429 per record, each marked
    assert series["records"][-1][1] == 20 and len(series["invocations"]) == 1
    assert max(n for _t, n in series["in_flight"]["writer"]) <= 4  # max_parallel_requests
    assert series["in_flight"]["writer"][-1][1] == 0
    svg, page = tmp_path / "r.svg", tmp_path / "r.html"
    cli("report", "llm", "-o", str(svg), home=home, check=True)
    cli("report", "llm", "-o", str(page), home=home, check=True)
    assert "<svg" in svg.read_text()[:2000]
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "<svg" in text and "Invocations" in text


@pytest.mark.slow
def test_a_run_without_traces_is_refused_with_the_way_to_get_them(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=50, rg=50)
    home = tmp_path / "home"
    cli("run", str(cfg), "--run-id", "plain", "--quiet", home=home, check=True,
        env=cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls")))
    proc = cli("report", "plain", "-o", str(tmp_path / "x.png"), home=home)
    assert proc.returncode == 2 and "--trace" in proc.stderr and "Traceback" not in proc.stderr
    # The run is complete: resuming it would trace nothing, so the advice is a new traced run.
    assert "pipeline run CONFIG --trace" in proc.stderr and "pipeline resume" not in proc.stderr
    assert not (tmp_path / "x.png").exists()
    bad = cli("report", "plain", "-o", str(tmp_path / "x.gif"), home=home)
    assert bad.returncode == 2 and "png" in bad.stderr


def test_a_run_not_yet_done_without_traces_is_told_to_resume_with_trace(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=50, rg=50)
    home = tmp_path / "home"
    cli("run", str(cfg), "--run-id", "later", "--create-only", "--quiet", home=home, check=True)
    proc = cli("report", "later", "-o", str(tmp_path / "x.png"), home=home)
    assert proc.returncode == 2 and f"`pipeline resume later --trace --home {home}`" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_the_legend_of_the_picture_never_covers_its_title(tmp_path):
    cfg = logged_pipeline(tmp_path / "p", records=40, rg=20)
    home = tmp_path / "home"
    run_id = "a-long-run-id-as-the-default-ones-of-a-long-config-name-are-0001"  # 64 characters, the most
    cli("run", str(cfg), "--run-id", run_id, "--trace", "--quiet", home=home, check=True,
        env=cli_env(PIPELINE_TEST_CALLS=str(tmp_path / "calls")))
    series_file = tmp_path / "series.json"
    cli("report", run_id, "--output", str(series_file), "--format", "json", home=home, check=True)

    import matplotlib.pyplot as plt
    from matplotlib.legend import Legend
    from matplotlib.text import Text

    from pipeline.reporting import _figure  # the figure report.png is saved from

    figure = _figure(json.loads(series_file.read_text()))
    try:
        figure.canvas.draw()  # Agg
        renderer = figure.canvas.get_renderer()
        [title] = [t for t in figure.findobj(Text) if t.get_text().startswith(f"run {run_id}")]
        [legend] = [lg for lg in figure.findobj(Legend) if "rate_limited" in [t.get_text() for t in lg.get_texts()]]
        title_box, legend_box = title.get_window_extent(renderer), legend.get_window_extent(renderer)
        assert not title_box.overlaps(legend_box), (title_box, legend_box)
        assert figure.bbox.contains(legend_box.x1 - 1, legend_box.y1 - 1), (figure.bbox, legend_box)
    finally:
        plt.close(figure)
