"""`python scripts/bench.py --section change`: applying a changed config that reopens one column
of a checkpointed run (`pipeline resume RUN_ID --config FILE`, the change's transaction only, not
the run after it): time and peak RSS of a fresh process, with the plan (`--plan`) beside it.

Shape: 3 samplers and 4 expression columns, row groups of 1,000, SQLite store; the change edits
the template of one expression read by nothing (so 1 column of 7 is computed again and every
row group is reopened from its Parquet file with the other columns' values).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CONFIG = """name: change
num_records: {records}
row_group_size: 1000
seed: 1
columns:
  - {{name: id, type: sampler, sampler: uuid}}
  - {{name: n, type: sampler, sampler: integer, params: {{low: 0, high: 100}}}}
  - {{name: word, type: sampler, sampler: category, params: {{values: [ant, bee, cat, dog]}}}}
  - {{name: a, type: expression, expr: "{{{{ word }}}}-{{{{ n }}}}"}}
  - {{name: b, type: expression, expr: "{{{{ a }}}}/{{{{ id }}}}"}}
  - {{name: c, type: expression, expr: "{{{{ word }}}}!"}}
  - {{name: d, type: expression, expr: "{{{{ n }}}}?"}}
"""


def child(home: str, config: str, dry_run: bool) -> dict:
    sys.path.insert(0, str(ROOT))
    from pipeline import api
    from pipeline.changes import apply_change, plan_change
    from pipeline.config import load_config

    home_path, store = api.open_state(home)
    cfg = load_config(config)
    info = store.get_run("change")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    plan = (plan_change if dry_run else apply_change)(store, info, cfg, home_path)
    elapsed = time.perf_counter() - t0
    return {"s": elapsed, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_before_mb": before, "row_groups": len(plan.result.row_groups),
            "compute": plan.columns["b"]["compute"]}


def change_section(records: int = 100_000) -> None:
    sys.path.insert(0, str(ROOT))
    import pipeline

    folder = Path(tempfile.mkdtemp(prefix="pipeline-bench-change-"))
    old, new = folder / "old.yaml", folder / "new.yaml"
    old.write_text(CONFIG.format(records=records))
    new.write_text(CONFIG.format(records=records).replace("}}/{{", "}}|{{"))
    home = folder / "home"
    assert pipeline.run(old, home=home, run_id="change").status == "complete"
    out = {}
    for label, dry in (("plan", True), ("apply", False)):
        proc = subprocess.run([sys.executable, __file__, "--child", str(home), str(new), "1" if dry else "0"],
                              capture_output=True, text=True, check=True, cwd=ROOT)
        out[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"change: {records:,} records x 7 columns, checkpointed, SQLite; 1 column reopened in "
          f"{out['apply']['row_groups']} row groups ({out['apply']['compute']:,} cells to compute)")
    for label, r in out.items():
        print(f"  {label:>5}: {r['s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(+{r['peak_rss_mb'] - r['rss_before_mb']:.0f} MB over the process before it)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(sys.argv[2], sys.argv[3], sys.argv[4] == "1")))
    else:
        change_section(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
