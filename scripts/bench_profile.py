"""Where the latency-bound makespan goes (issue 12 item 2): one warm ``pipeline.run`` of a latency
shape (200 records, cells sleeping 50 ms, 64 in flight, row groups of 50), with

- a timeline from the cells themselves: start-up (call -> first cell), tail (last cell done ->
  ``pipeline.run`` returns), mean cells in flight, and the time with fewer than 64 in flight while
  more than 64 cells were still to start (admission gaps);
- the CPU seconds of every thread (from /proc), so the journal writer's share shows;
- with ``--pyinstrument FILE``, a pyinstrument profile of the main thread (text) written to FILE.

    python scripts/bench_profile.py --shape dual --pyinstrument /tmp/dual.txt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from bench_compare import CRITICAL_PATH, IN_FLIGHT, LATENCY_S, SHAPES, write_config  # noqa: E402

TIMELINE = '''
import asyncio, time
EVENTS = []


async def timed(row):
    t = time.perf_counter()
    await asyncio.sleep(%r)
    EVENTS.append((t, time.perf_counter()))
    return 1
'''


class CpuSampler(threading.Thread):
    """utime + stime of each thread of this process (by name), read from /proc every 20 ms."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.cpu: dict[str, float] = {}
        self.halt = threading.Event()
        self.tick = os.sysconf("SC_CLK_TCK")

    def sample(self) -> None:
        names = {t.native_id: t.name for t in threading.enumerate()}
        for task in Path("/proc/self/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            name = names.get(int(task.name), f"thread {task.name}")
            self.cpu[f"{name} ({task.name})"] = (int(fields[11]) + int(fields[12])) / self.tick

    def run(self) -> None:
        while not self.halt.wait(0.02):
            self.sample()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=list(SHAPES), default="dual")
    parser.add_argument("--pyinstrument", metavar="FILE")
    args = parser.parse_args()
    import pipeline

    folder = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    path = write_config(folder, args.shape, 200)
    text = path.read_text()
    for column in SHAPES[args.shape]:  # every cell column runs the timed sleep
        text = text.replace(f"'cmp_fns:f_{column}'", "'tl_fns:timed'")
    path.write_text(text)
    (folder / "tl_fns.py").write_text(TIMELINE % LATENCY_S)
    home = folder / "home"
    pipeline.run(path, home=home, run_id="warm", num_records=100)
    import tl_fns

    tl_fns.EVENTS.clear()
    profiler = None
    if args.pyinstrument:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0005, async_mode="disabled")
    cpu = CpuSampler()
    cpu.sample()
    before = dict(cpu.cpu)
    cpu.start()
    if profiler:
        profiler.start()
    t0 = time.perf_counter()
    result = pipeline.run(path, home=home, run_id="timed")
    t1 = time.perf_counter()
    if profiler:
        profiler.stop()
    cpu.halt.set()
    cpu.join()
    cpu.sample()
    assert result.status == "complete"
    events = sorted(tl_fns.EVENTS)
    cells = len(events)
    bound = max(CRITICAL_PATH[args.shape] * LATENCY_S, cells * LATENCY_S / IN_FLIGHT)
    edges = sorted([(s, 1) for s, _ in events] + [(e, -1) for _, e in events])
    in_flight, started, last, under, busy = 0, 0, events[0][0], 0.0, 0.0
    for t, step in edges:
        busy += in_flight * (t - last)
        if in_flight < IN_FLIGHT and cells - started > IN_FLIGHT:
            under += t - last
        in_flight += step
        started += step == 1
        last = t
    span = max(e for _, e in events) - events[0][0]
    report = {"shape": args.shape, "makespan_s": t1 - t0, "bound_s": bound, "ratio": (t1 - t0) / bound,
              "startup_s": events[0][0] - t0, "tail_s": t1 - max(e for _, e in events),
              "cells_span_s": span, "mean_in_flight": busy / span,
              "mean_cell_s": sum(e - s for s, e in events) / cells,
              "under_64_with_work_waiting_s": under,
              "thread_cpu_s": {k: round(v - before.get(k, 0.0), 3) for k, v in cpu.cpu.items()}}
    print(json.dumps(report, indent=2))
    if profiler:
        Path(args.pyinstrument).write_text(profiler.output_text(unicode=False, show_all=False))


if __name__ == "__main__":
    main()
