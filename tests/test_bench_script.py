"""`python scripts/bench.py --compare --quick`: every case of issue 12 at tiny sizes, one table and
its JSON. Checks the cases and that the figures are positive numbers, never how fast they are."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CASES = ["overhead_200x3", "overhead_200x10", "latency_narrow", "latency_deep", "latency_wide", "latency_dual",
         "failures_dual", "llm_dual", "resume", "cold_start_fresh", "cold_start_existing", "scale_2000x10"]

#: the figures each case must carry, on our side
FIGURES = {"overhead": ["tasks_per_s", "peak_rss_mb", "db_mb"], "latency": ["seconds", "bound_s", "ratio", "ratio_waves"],
           "failures": ["seconds", "bound_s", "ratio"], "llm": ["seconds", "bound_s", "ratio", "floor_s", "ratio_floor"],
           "resume": ["seconds", "wall_s"], "cold": ["seconds", "wall_s"],
           "scale": ["tasks_per_s", "peak_rss_mb", "db_mb", "db_mb_during", "seconds"]}


def positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.timeout(900)
@pytest.mark.slow
def test_compare_quick_prints_one_table_and_json_with_every_case(tmp_path):
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "scripts/bench.py", "--compare", "--quick", "--json", str(out_json)],
                          cwd=ROOT, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    assert list(report["cases"]) == CASES
    table = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(table) if line.startswith("case "))
    assert [line.split()[0] for line in table[header + 2:]] == CASES  # one table, a line per case
    for key, case in report["cases"].items():
        kind = key.split("_")[0]
        for figure in FIGURES[kind]:
            assert positive(case["ours"][figure]), (key, figure, case["ours"])
        ref = case["reference"]
        if ref is not None:  # the reference runs the overhead, latency and failure cases where installed
            assert kind in ("overhead", "latency", "failures")
            assert all(positive(ref[f]) for f in FIGURES[kind] if f != "db_mb"), (key, ref)  # it has no store
    if not report["reference"]["available"]:
        assert "reference: skipped (pip install -e '.[bench]')" in proc.stdout
        assert all(case["reference"] is None for case in report["cases"].values())
