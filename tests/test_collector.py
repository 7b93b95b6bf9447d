"""The garbage collector is tuned while a run runs (pipeline.engine.collector) and left as it
was found afterwards: a library must not change its caller's process for good."""

from __future__ import annotations

import gc
import textwrap
import threading

import pipeline
from pipeline.engine import collector


def _config(tmp_path, name):
    (tmp_path / f"{name}_fns.py").write_text(textwrap.dedent("""\
        import gc
        seen = []

        def cell(row):
            seen.append((gc.get_threshold()[0], gc.get_freeze_count() > 0))
            return 1
        """))
    path = tmp_path / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        num_records: 5
        columns:
          - {{name: n, type: sampler, sampler: integer, params: {{low: 1, high: 5}}}}
          - {{name: c, type: python, function: '{name}_fns:cell', requires: [n]}}
        """))
    return path


def test_a_run_tunes_the_collector_and_restores_it(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    before = gc.get_threshold()
    gc.set_threshold(777, 11, 12)
    try:
        result = pipeline.run(_config(tmp_path, "gc_one"), home=tmp_path / "home")
        import gc_one_fns

        assert result.status == "complete"
        assert gc_one_fns.seen and set(gc_one_fns.seen) == {(collector.YOUNG_THRESHOLD, True)}
        assert gc.get_threshold() == (777, 11, 12)
        assert gc.get_freeze_count() == 0
    finally:
        gc.set_threshold(*before)


def test_overlapping_runs_restore_the_collector_when_the_last_ends(tmp_path):
    before = gc.get_threshold()
    entered, release = threading.Event(), threading.Event()

    def hold():
        with collector.tuned():
            entered.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert entered.wait(60)
        with collector.tuned():
            assert gc.get_threshold()[0] == collector.YOUNG_THRESHOLD
        assert gc.get_threshold()[0] == collector.YOUNG_THRESHOLD  # the other run is still running
        assert gc.get_freeze_count() > 0
    finally:
        release.set()
        holder.join(60)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
