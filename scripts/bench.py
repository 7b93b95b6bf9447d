"""Benchmarks of `pipeline`, printed as one table of figures measured in one run.

    python scripts/bench.py                 # engine: 10k and 100k records, memory vs SQLite store
    python scripts/bench.py --records 10000 --repeat 3
    python scripts/bench.py --section latency  # the dual shape with 50 ms python cells (no HTTP)
    python scripts/bench.py --section dual  # LLM "dual" shape against the fake server
    python scripts/bench.py --section tracing --records 10000  # the cost of --trace (on / off)
    python scripts/bench.py --section commands  # status, runs, sql, export, --help on a 100,000-record store
    python scripts/bench.py --compare --json out.json  # issue 12: every case, ours beside the reference
    python scripts/bench.py --compare --quick  # the same cases at tiny sizes (a smoke test)
    python scripts/bench.py --section change  # resume --config reopening 1 column of 100k records

Engine shape (issue 2): a 10-column pipeline of no-op async python columns: one sampler root,
8 cell columns reading it, one batch column reading them all; row groups of 1,000. Each case
runs in a fresh subprocess so that its peak RSS is its own; the figure printed is the median of
``--repeat`` runs. The SQLite case records every state change (the journal) in a real file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))

CELLS = 8

MODULE = '''
async def noop(row):
    return 1

async def sink(df):
    return [0] * len(df)
'''


def write_config(folder: Path, records: int) -> Path:
    (folder / "bench_fns.py").write_text(MODULE)
    cols = ["  - {name: root, type: sampler, sampler: integer, params: {low: 0, high: 1000000}}"]
    cols += [f"  - {{name: c{i}, type: python, function: 'bench_fns:noop', requires: [root]}}" for i in range(CELLS)]
    reqs = ", ".join(f"c{i}" for i in range(CELLS))
    cols += [f"  - {{name: sink, type: python, function: 'bench_fns:sink', mode: batch, requires: [{reqs}]}}"]
    text = (f"name: bench\nnum_records: {records}\nrow_group_size: 1000\n"
            f"settings: {{max_in_flight_tasks: 256, max_concurrent_row_groups: 3}}\ncolumns:\n" + "\n".join(cols) + "\n")
    path = folder / "bench.yaml"
    path.write_text(text)
    return path


def one_case(store_kind: str, records: int) -> dict:
    """Runs in the child process."""
    from pipeline.config import load_config
    from pipeline.engine.scheduler import Scheduler, SchedulerOptions
    from pipeline.engine.tracker import Plan
    from pipeline.generators import build_generators
    from pipeline.graph import build_graph
    from pipeline.store.base import ColumnSpec, NewRun

    folder = Path(tempfile.mkdtemp(prefix="pipeline-bench-"))
    cfg = load_config(write_config(folder, records))
    graph = build_graph(cfg)
    traced = store_kind.endswith("+trace")
    store_kind = store_kind.removesuffix("+trace")
    if store_kind == "memory":
        from pipeline.store.memory import MemoryStore
        store = MemoryStore()
    else:
        from sqlalchemy.engine import URL

        from pipeline.store import open_store
        store = open_store(URL.create("sqlite", database=str(folder / "state.db")))
    store.create_run(NewRun("bench", cfg.name, cfg.num_records, cfg.row_group_size, cfg.seed, cfg.to_json(),
                            cfg.fingerprint(), [ColumnSpec(c, graph.producer[c], "cell", i)
                                                for i, c in enumerate(graph.columns)]))
    plan = Plan(graph, build_generators(cfg))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    sched = Scheduler(plan, store, "bench", num_records=records, row_group_size=cfg.row_group_size,
                      home=str(folder), options=SchedulerOptions.from_settings(cfg.settings, trace=traced))
    from pipeline.api.jobs import loop_factory  # the event loop `pipeline run` uses (uvloop if installed)
    from pipeline.engine.tracing import TraceWriter

    tracer = TraceWriter(sched, store, "bench") if traced else None

    async def main() -> str:
        writer = asyncio.get_running_loop().create_task(tracer.run()) if tracer else None
        try:
            return await sched.run()
        finally:
            if writer is not None:
                writer.cancel()

    t0 = time.perf_counter()
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        status = runner.run(main())
    if tracer is not None:
        tracer.flush()
    elapsed = time.perf_counter() - t0
    assert status == "complete", status
    tasks = sched.stats.tasks_done
    assert tasks == records * CELLS + 2 * (-(-records // 1000)), tasks
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    store.close()
    return {"store": store_kind, "records": records, "tasks": tasks, "seconds": elapsed,
            "tasks_per_s": tasks / elapsed, "peak_rss_mb": rss, "rss_before_mb": rss_before,
            "journal_events": sched.journal.events_written, "journal_batches": sched.journal.batches}


def run_child(store_kind: str, records: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", store_kind, str(records)], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def engine_section(records_list: list[int], repeat: int) -> None:
    from pipeline.api.jobs import loop_factory

    loop = "uvloop" if loop_factory() else "asyncio"
    print(f"engine: 10 columns (1 sampler root, {CELLS} no-op async cells, 1 batch sink), row groups of 1,000, "
          f"{loop} event loop, median of {repeat}")
    print(f"{'records':>9} {'store':>7} {'tasks/s':>10} {'peak RSS MB':>12} {'RSS growth MB':>14} {'batches':>8}")
    for records in records_list:
        rates = {}
        for kind in ("memory", "sqlite"):
            runs = [run_child(kind, records) for _ in range(repeat)]
            med = statistics.median(r["tasks_per_s"] for r in runs)
            rss = statistics.median(r["peak_rss_mb"] for r in runs)
            growth = statistics.median(r["peak_rss_mb"] - r["rss_before_mb"] for r in runs)
            rates[kind] = med
            print(f"{records:>9,} {kind:>7} {med:>10,.0f} {rss:>12.0f} {growth:>14.0f} "
                  f"{statistics.median(r['journal_batches'] for r in runs):>8.0f}")
        cost = 1 - rates["sqlite"] / rates["memory"]
        print(f"{records:>9,}  sqlite/memory = {rates['sqlite'] / rates['memory']:.2f} "
              f"(durable store costs {cost:.0%}); reference engine: 5,300-7,300 tasks/s in memory")


def tracing_section(records: int, repeat: int) -> None:
    """The cost of --trace: the engine case on SQLite with every attempt recorded, and without."""
    rates = {}
    for kind in ("sqlite", "sqlite+trace"):
        rates[kind] = statistics.median(run_child(kind, records)["tasks_per_s"] for _ in range(repeat))
    print(f"tracing: {records:,} records x 10 columns on SQLite, median of {repeat}: off {rates['sqlite']:,.0f} "
          f"tasks/s, on {rates['sqlite+trace']:,.0f} tasks/s, on/off = {rates['sqlite+trace'] / rates['sqlite']:.2f}")


def commands_section(records: int, repeat: int) -> None:
    """`status`, `runs`, `sql`, `export` and `--help` on a store holding a run of ``records``
    records (scripts/command_times.py, each command in a fresh process)."""
    print(f"commands on a store with a {records:,}-record run (scripts/command_times.py):", flush=True)
    subprocess.run([sys.executable, str(Path(__file__).with_name("command_times.py")), "--records", str(records),
                    "--repeat", str(repeat)], check=True, cwd=ROOT)


LATENCY_FNS = """
import asyncio


async def call(row):
    await asyncio.sleep(0.05)
    return 1
"""


def latency_section(repeat: int) -> None:
    """The "dual" shape with no HTTP: 3 writer columns each read by a judge column, python
    cells that sleep 50 ms, 200 records, 64 in flight. Isolates the engine's own scheduling
    overhead (admission, dispatch, journal, checkpoints, start-up) from any client or server."""
    import pipeline

    folder = Path(tempfile.mkdtemp(prefix="pipeline-bench-lat-"))
    (folder / "lat_fns.py").write_text(LATENCY_FNS)
    cols = ["  - {name: id, type: sampler, sampler: uuid}"]
    for i in range(3):
        cols.append(f"  - {{name: w{i}, type: python, function: 'lat_fns:call', requires: [id]}}")
        cols.append(f"  - {{name: j{i}, type: python, function: 'lat_fns:call', requires: [w{i}]}}")
    path = folder / "dual.yaml"
    path.write_text("name: dual\nnum_records: 200\nrow_group_size: 50\n"
                    "settings: {max_in_flight_tasks: 64, max_concurrent_row_groups: 4}\ncolumns:\n"
                    + "\n".join(cols) + "\n")
    home = folder / "home"
    pipeline.run(path, home=home, run_id="warm")  # imports and the store's migrations, untimed
    bound = max(2 * 0.05, 1200 * 0.05 / 64)
    times = []
    for i in range(repeat):
        t0 = time.perf_counter()
        result = pipeline.run(path, home=home, run_id=f"lat-{i}")
        times.append(time.perf_counter() - t0)
        assert result.status == "complete"
    med = statistics.median(times)
    print(f"latency (dual shape, no HTTP): 1,200 cells of 50 ms, 64 in flight, SQLite store, median of {repeat}: "
          f"makespan {med:.3f} s, bound {bound:.3f} s, ratio {med / bound:.3f} (reference engine 1.16)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=2, metavar=("STORE", "RECORDS"), help=argparse.SUPPRESS)
    parser.add_argument("--section", choices=["engine", "latency", "dual", "tracing", "commands", "change", "all"],
                        default="engine")
    parser.add_argument("--records", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--compare", action="store_true",
                        help="every case of issue 12, ours beside the reference (scripts/bench_compare.py)")
    parser.add_argument("--quick", action="store_true", help="with --compare: tiny sizes, one run each, cases batched in one process (a smoke test)")
    parser.add_argument("--scale", action="store_true",
                        help="with --compare: also 1,000,000 x 10 (ours) and the reference's 100,000 x 10 (minutes)")
    parser.add_argument("--json", metavar="FILE", help="with --compare: also write the figures as JSON")
    parser.add_argument("--no-reference", action="store_true", help="with --compare: ours only")
    parser.add_argument("--reference-python", metavar="PATH",
                        help="with --compare: the interpreter that has data-designer-engine 0.9.7")
    parser.add_argument("--verbose", action="store_true", help="with --compare: print each case's figures as it ends")
    parser.add_argument("--compare-child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_case(args.child[0], int(args.child[1]))))
        return
    if args.compare or args.compare_child:
        import bench_compare

        if args.compare_child:
            spec = json.loads(args.compare_child)
            print(json.dumps(bench_compare.CHILDREN[spec["kind"]](spec)))
        else:
            bench_compare.compare(args)
        return
    if args.section in ("engine", "all"):
        engine_section(args.records, args.repeat)
    if args.section in ("latency", "all"):
        latency_section(args.repeat)
    if args.section in ("tracing", "all"):
        tracing_section(args.records[0], args.repeat)
    if args.section in ("commands", "all"):
        commands_section(100_000 if args.records == [10_000, 100_000] else args.records[-1], args.repeat)
    if args.section in ("dual", "all"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_llm import dual_section

        dual_section(repeat=args.repeat)
    if args.section in ("change", "all"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_change import change_section

        change_section()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
