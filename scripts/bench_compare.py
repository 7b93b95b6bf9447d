"""`python scripts/bench.py --compare`: every case of issue 12 in fresh subprocesses, ours beside
the reference engine (DataDesigner 0.9.7's in-memory ``AsyncTaskScheduler``, scripts/bench_reference.py)
where it is installed; one table, and ``--json FILE``.

Ours is timed through the public API, ``pipeline.run(config, home=...)`` (SQLite store), after a
warm-up run of the same shape in the same home and process: imports and the store's schema are
excluded, as the reference's timing excludes its own imports and set-up. Start-up as users meet it
(``pipeline run`` from a new process) is the cold-start case. Each figure is the median of
``--repeat`` child processes (the reference: one child per repeat too).

Cases (``key``: what is printed):

- ``overhead_<N>x<C>``: no-op async python cells, N records x C columns (1 sampler root, C-2 cells,
  1 batch sink; row groups of 1,000, 3 at once, 256 in flight): tasks/s, peak RSS, database size.
  The reference's 100,000 x 10 case takes ~10 minutes here: it runs only with ``--scale``.
- ``latency_<shape>``: narrow / deep / wide / dual (bench_reference.SHAPES), 200 records, cells
  sleeping 50 ms, 64 in flight, row groups of 50 (4 at once): makespan / bound, bound =
  max(critical path x 0.05, cells x 0.05 / 64); "waves": / max(critical path, ceil(cells / 64)) x 0.05.
- ``failures_dual``: dual with 5 % of cells failing once (retryable) and 1 % for good, backoff 50 ms;
  ratio to the fault-free bound.
- ``llm_dual``: scripts/bench_llm.py's dual shape against scripts/fake_llm_server.py: makespan /
  bound and / the machine floor (raw asyncio HTTP client, same server and chains). Ours only.
- ``resume``: a 100,000 x 10 run (CLI) SIGKILLed when half of its cells are done; then
  ``pipeline resume``: seconds from its process start to its first python cell, and to its exit.
- ``cold_start_fresh`` / ``cold_start_existing``: ``pipeline run`` (a new process) of a 100-record
  no-op config: seconds from process start to the first python cell, in a new home and in one
  that holds a run already.
- ``scale_1000000x10`` (``--scale`` only, minutes): wall, peak RSS, database size during
  (largest seen, sampled every second) and after.

A cell marks its first call from outside the engine: the functions module writes
``time.time()`` to the file named by ``$BENCH_FIRST`` on its first call in a process, and
touches ``$BENCH_HALF`` when it has run ``$BENCH_HALF_N`` cells.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_reference import SHAPES  # noqa: E402  (shapes shared with the reference runner)

LATENCY_S = 0.05
IN_FLIGHT = 64
CRITICAL_PATH = {"narrow": 4, "deep": 3, "wide": 1, "dual": 2}
SKIPPED = "reference: skipped (pip install -e '.[bench]')"

FNS = '''
import asyncio, os, time, zlib

_n = 0
_seen = set()
RETRY = float(os.environ.get("BENCH_RETRY", "0"))
FAIL = float(os.environ.get("BENCH_FAIL", "0"))
SLEEP = float(os.environ.get("BENCH_SLEEP", "0"))


FIRST, HALF = os.environ.get("BENCH_FIRST"), os.environ.get("BENCH_HALF")  # read once: a lookup
HALF_N = int(os.environ.get("BENCH_HALF_N", "0"))  # in os.environ per cell (~2 us) is not the engine's


def _mark():
    global _n
    _n += 1
    if _n == 1 and FIRST:
        with open(FIRST, "w") as f:
            f.write(repr(time.time()))
    if HALF and _n == HALF_N:
        open(HALF, "w").close()


async def cell(column, row):
    _mark()
    if SLEEP:
        await asyncio.sleep(SLEEP)
    if not (RETRY or FAIL):
        return 1
    key = next(iter(row.values()))  # the record's root uuid, passed down the chain by each cell
    h = zlib.crc32(f"{column}:{key}".encode()) % 10000
    if h < FAIL * 10000:
        raise ValueError("permanent failure")
    if h < (FAIL + RETRY) * 10000 and (column, key) not in _seen:
        from pipeline.errors import RetryableError
        _seen.add((column, key))
        raise RetryableError("503 once")
    return key


async def sink(df):
    return [0] * len(df)
'''


def write_config(folder: Path, shape: str, records: int, *, columns: int = 10) -> Path:
    """The YAML of a shape (``noop`` with ``columns``, or a latency shape) in ``folder``."""
    if shape == "noop":
        cells, sink = {f"c{i}": ["root"] for i in range(columns - 2)}, True
        size, at_once, in_flight, backoff = 1000, 3, 256, 0.5
    else:
        cells, sink = SHAPES[shape], False
        size, at_once, in_flight, backoff = 50, 4, IN_FLIGHT, LATENCY_S
    fns = FNS + "".join(f"\n\nasync def f_{c}(row):\n    return await cell({c!r}, row)\n" for c in cells)
    (folder / "cmp_fns.py").write_text(fns)
    cols = ["  - {name: root, type: sampler, sampler: uuid}"]
    cols += [f"  - {{name: {c}, type: python, function: 'cmp_fns:f_{c}', requires: [{', '.join(r)}]}}"
             for c, r in cells.items()]
    if sink:
        cols.append(f"  - {{name: sink, type: python, function: 'cmp_fns:sink', mode: batch, "
                    f"requires: [{', '.join(cells)}]}}")
    path = folder / f"{shape}.yaml"
    path.write_text(f"name: {shape}\nnum_records: {records}\nrow_group_size: {size}\n"
                    f"settings: {{max_in_flight_tasks: {in_flight}, max_concurrent_row_groups: {at_once}, "
                    f"retry_backoff_s: {backoff}}}\ncolumns:\n" + "\n".join(cols) + "\n")
    return path


def db_mb(home: Path) -> float:
    return sum(p.stat().st_size for p in home.glob("state.db*")) / 2**20


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- children: one case each, in a fresh process ------------------------------------------------
_FOLDERS: list[Path] = []


def new_folder(prefix: str) -> Path:
    """A temporary folder that the child removes when it is done (removes_its_folders)."""
    _FOLDERS.append(Path(tempfile.mkdtemp(prefix=prefix)))
    return _FOLDERS[-1]


def removes_its_folders(fn):
    def wrapper(spec: dict) -> dict:
        try:
            return fn(spec)
        finally:
            while _FOLDERS:
                shutil.rmtree(_FOLDERS.pop(), ignore_errors=True)
    return wrapper


@removes_its_folders
def child_api(spec: dict) -> dict:
    """A shape through ``pipeline.run`` after a warm-up run in the same home."""
    import pipeline

    for name in ("BENCH_SLEEP", "BENCH_RETRY", "BENCH_FAIL"):  # a batch runs several cases in one process
        os.environ.pop(name, None)
    os.environ.update({k: str(v) for k, v in spec.get("env", {}).items()})
    sys.modules.pop("cmp_fns", None)  # this case's functions module, from its own folder
    folder = new_folder("bench-cmp-")
    home = folder / "home"
    path = write_config(folder, spec["shape"], spec["records"], columns=spec.get("columns", 10))
    size = 1000 if spec["shape"] == "noop" else 50
    pipeline.run(path, home=home, run_id="warm", num_records=min(spec["records"], 2 * size))
    before, sampler = rss_mb(), DbSampler(home) if spec.get("sample_db") else None
    t0 = time.perf_counter()
    result = pipeline.run(path, home=home, run_id="timed")
    seconds = time.perf_counter() - t0
    if sampler:
        sampler.stop()
    assert result.status == "complete", result
    out = {"seconds": seconds, "tasks": result.stats.tasks_done, "peak_rss_mb": rss_mb(), "rss_before_mb": before,
           "db_mb": db_mb(home), "records_dropped": result.stats.records_dropped}
    if sampler:
        out["db_mb_during"] = sampler.largest
    return out


class DbSampler(threading.Thread):
    """The largest size of the state store's files, sampled every second."""

    def __init__(self, home: Path) -> None:
        super().__init__(daemon=True)
        self.home, self.largest, self.halt = home, 0.0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.halt.wait(1.0):
            self.largest = max(self.largest, db_mb(self.home))

    def stop(self) -> None:
        self.halt.set()
        self.join()
        self.largest = max(self.largest, db_mb(self.home))


def child_llm(spec: dict) -> dict:
    import bench_llm
    from bench_llm_floors import ideal_client_run

    if spec["records"] != bench_llm.RECORDS:
        bench_llm.RECORDS = spec["records"]
        bench_llm.CALLS = spec["records"] * bench_llm.WRITERS * 2
    bench_llm.one_run([], seed=999)  # warm-up
    makespan = bench_llm.one_run([], seed=spec["seed"])["makespan"]
    floor = ideal_client_run(spec["seed"] + 1)
    return {"seconds": makespan, "floor_s": floor, "bound_s": bench_llm.lower_bound(bench_llm.CALLS, False)}


def cli(*args: str, env: dict | None = None, **kw) -> subprocess.Popen:
    full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, env=full,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)


def wait_file(path: Path, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode} before {path.name}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)


def first_cell_after(t0: float, mark: Path) -> float:
    return float(mark.read_text()) - t0


@removes_its_folders
def child_resume(spec: dict) -> dict:
    folder = new_folder("bench-resume-")
    home = str(folder / "home")
    path = write_config(folder, "noop", spec["records"], columns=10)
    half = folder / "half"
    proc = cli("run", str(path), "--run-id", "r", "--quiet", "--home", home,
               env={"BENCH_HALF": str(half), "BENCH_HALF_N": str(spec["records"] * 8 // 2)})
    wait_file(half, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = folder / "first"
    t0 = time.time()
    proc = cli("resume", "r", "--quiet", "--home", home, env={"BENCH_FIRST": str(first)})
    _, err = proc.communicate(timeout=1800)
    wall = time.time() - t0
    assert proc.returncode == 0, err[-2000:]
    return {"seconds": first_cell_after(t0, first), "wall_s": wall}


@removes_its_folders
def child_cold(spec: dict) -> dict:
    folder = new_folder("bench-cold-")
    home = str(folder / "home")
    path = write_config(folder, "noop", spec["records"], columns=3)
    out = {}
    for case, run_id in (("fresh", "c1"), ("existing", "c2")):
        first = folder / f"first-{case}"
        t0 = time.time()
        proc = cli("run", str(path), "--run-id", run_id, "--quiet", "--home", home, env={"BENCH_FIRST": str(first)})
        _, err = proc.communicate(timeout=600)
        wall = time.time() - t0
        assert proc.returncode == 0, err[-2000:]
        out[case] = first_cell_after(t0, first)
        out[f"{case}_wall_s"] = wall
    return out


def child_batch(spec: dict) -> list[dict]:
    """Several api cases in one process (``--quick`` only: process starts dominate tiny cases)."""
    return [child_api(one) for one in spec["specs"]]


CHILDREN = {"api": child_api, "llm": child_llm, "resume": child_resume, "cold": child_cold, "batch": child_batch}
#: results of --quick's batched children, by the JSON of their spec
_PREFETCHED: dict[str, dict] = {}


def prefetch(specs: list[dict], ref_specs: list[dict], ref_python: str | None) -> None:
    """Runs ``specs`` in one child and ``ref_specs`` in one reference process (``--quick``)."""
    results = run_child({"kind": "batch", "specs": specs}) if specs else []
    _PREFETCHED.update({json.dumps(["ours", sp]): r for sp, r in zip(specs, results)})
    if ref_specs and ref_python:
        results = run_reference(ref_python, ref_specs)
        _PREFETCHED.update({json.dumps(["ref", sp]): r for sp, r in zip(ref_specs, results)})


def run_child(spec: dict) -> dict:
    if json.dumps(["ours", spec]) in _PREFETCHED:
        return _PREFETCHED.pop(json.dumps(["ours", spec]))
    out = subprocess.run([sys.executable, str(HERE / "bench.py"), "--compare-child", json.dumps(spec)],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise RuntimeError(f"child {spec} failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_reference(python: str, spec: dict | list) -> dict | list:
    if json.dumps(["ref", spec]) in _PREFETCHED:
        return _PREFETCHED.pop(json.dumps(["ref", spec]))
    out = subprocess.run([python, str(HERE / "bench_reference.py"), json.dumps(spec)], capture_output=True,
                         text=True, cwd=ROOT)
    if out.returncode:
        raise RuntimeError(f"reference {spec} failed: {out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def reference_python(explicit: str | None) -> str | None:
    """The interpreter with data-designer-engine 0.9.7: ``--reference-python``,
    ``$PIPELINE_BENCH_REFERENCE_PYTHON``, this one if it has it, or /tmp/ddvenv (a separate venv,
    where the extra would downgrade packages the project needs)."""
    for candidate in (explicit, os.environ.get("PIPELINE_BENCH_REFERENCE_PYTHON"), sys.executable,
                      "/tmp/ddvenv/bin/python"):
        if candidate and Path(candidate).exists() and subprocess.run(
                [candidate, "-c", "import data_designer.engine.dataset_builders.async_scheduler"],
                capture_output=True).returncode == 0:
            return candidate
    return None


# -- the cases ----------------------------------------------------------------------------------
def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], (int, float))}


def cases(quick: bool, scale: bool) -> list[dict]:
    """Every case: key, what ours runs (child spec), what the reference runs (or None)."""
    records = 200 if quick else 10_000
    big = 1000 if quick else 100_000
    out = []
    for n, c in ((records, 3), (records, 10)) if quick else ((records, 3), (records, 10), (big, 3), (big, 10)):
        ref = {"shape": "noop", "columns": c, "records": n, "row_group_size": 1000, "row_groups_at_once": 3,
               "in_flight": 256}
        out.append({"key": f"overhead_{n}x{c}", "kind": "overhead",
                    "ours": {"kind": "api", "shape": "noop", "records": n, "columns": c},
                    # the reference's 100k x 10 takes ~10 min here: only with --scale; 100k cases once
                    "ref": ref if (quick or scale or (n, c) != (big, 10)) else None,
                    "ref_repeat": 1 if n >= 100_000 else None})
    lat, lat_records = (0.01, 40) if quick else (LATENCY_S, 200)
    for shape in (*SHAPES, "failures"):
        faults = shape == "failures"
        s = "dual" if faults else shape
        env = {"BENCH_SLEEP": lat, **({"BENCH_RETRY": 0.05, "BENCH_FAIL": 0.01} if faults else {})}
        cells = lat_records * len(SHAPES[s])
        out.append({"key": "failures_dual" if faults else f"latency_{shape}", "kind": "latency",
                    "bound_s": max(CRITICAL_PATH[s] * lat, cells * lat / IN_FLIGHT),
                    "waves_s": max(CRITICAL_PATH[s] * lat, -(-cells // IN_FLIGHT) * lat),  # no slot runs a part cell
                    "ours": {"kind": "api", "shape": s, "records": lat_records, "env": env},
                    "ref": {"shape": s, "records": lat_records, "row_group_size": 50, "row_groups_at_once": 4,
                            "in_flight": IN_FLIGHT, "latency_s": lat,
                            **({"retry_rate": 0.05, "fail_rate": 0.01} if faults else {})}})
    out.append({"key": "llm_dual", "kind": "llm", "ours": {"kind": "llm", "records": 20 if quick else 200}})
    out.append({"key": "resume", "kind": "resume", "ours": {"kind": "resume", "records": big}})
    out.append({"key": "cold_start", "kind": "cold", "ours": {"kind": "cold", "records": 100}})
    if scale or quick:
        n = 2000 if quick else 1_000_000
        out.append({"key": f"scale_{n}x10", "kind": "scale", "repeat": 1,
                    "ours": {"kind": "api", "shape": "noop", "records": n, "columns": 10, "sample_db": True}})
    return out


def measure(case: dict, repeat: int, ref_python: str | None) -> dict:
    n = case.get("repeat", repeat)
    runs = []
    for i in range(n):
        spec = {**case["ours"], "seed": 100 + i}
        runs.append(run_child(spec))
    result = {"ours": median_of(runs), "reference": None}
    if case.get("ref") and ref_python:
        k = min(n, case.get("ref_repeat") or n)
        result["reference"] = median_of([run_reference(ref_python, case["ref"]) for _ in range(k)])
        result["reference"]["runs"] = k
    result["ours"]["runs"] = n
    for r in filter(None, (result["ours"], result["reference"])):
        if case["kind"] in ("overhead", "scale"):
            r["tasks_per_s"] = r["tasks"] / r["seconds"]
        if case["kind"] == "latency":
            r["bound_s"], r["ratio"] = case["bound_s"], r["seconds"] / case["bound_s"]
            r["ratio_waves"] = r["seconds"] / case["waves_s"]
        if case["kind"] == "llm":
            r["ratio"] = r["seconds"] / r["bound_s"]
            r["ratio_floor"] = r["seconds"] / r["floor_s"]
    return result


def row(key: str, res: dict) -> list[tuple[str, str, str, str]]:
    """(case, ours, reference, ours vs reference) lines of the table for one case."""
    o, r = res["ours"], res["reference"]
    if key.startswith(("overhead", "scale")):
        line = (f"{o['tasks_per_s']:,.0f} tasks/s, peak RSS {o['peak_rss_mb']:.0f} MB, db {o['db_mb']:.1f} MB"
                + (f" (during {o['db_mb_during']:.1f} MB), wall {o['seconds']:.1f} s" if "db_mb_during" in o else ""))
        ref = f"{r['tasks_per_s']:,.0f} tasks/s, peak RSS {r['peak_rss_mb']:.0f} MB" if r else "-"
        return [(key, line, ref, f"{o['tasks_per_s'] / r['tasks_per_s']:.1f}x" if r else "")]
    if key.startswith(("latency", "failures")):
        line = f"{o['seconds']:.3f} s / {o['bound_s']:.3f} s = {o['ratio']:.2f} (waves {o['ratio_waves']:.2f})"
        ref = f"{r['seconds']:.3f} s / {r['bound_s']:.3f} s = {r['ratio']:.2f} (waves {r['ratio_waves']:.2f})" if r else "-"
        return [(key, line, ref, f"{o['seconds'] / r['seconds']:.2f} of its makespan" if r else "")]
    if key == "llm_dual":
        return [(key, f"{o['seconds']:.3f} s: / bound {o['ratio']:.2f}, / machine floor ({o['floor_s']:.3f} s) "
                      f"{o['ratio_floor']:.2f}", "-", "")]
    if key == "resume":
        return [(key, f"{o['seconds']:.3f} s to first new task (resume exits after {o['wall_s']:.1f} s)", "-", "")]
    return [(key, f"{o['seconds']:.3f} s to first task (`pipeline run` exits after {o['wall_s']:.2f} s)", "-", "")]


def compare(args) -> dict:
    """Runs every case, prints the table, returns (and writes with --json) the figures."""
    ref_python = None if args.no_reference else reference_python(args.reference_python)
    repeat = 1 if args.quick else args.repeat
    print(f"compare: ours = pipeline.run (SQLite store, warm home) vs reference = DataDesigner 0.9.7 "
          f"AsyncTaskScheduler (in memory); median of {repeat}; {os.cpu_count()} cores"
          + (" (quick sizes)" if args.quick else ""), flush=True)
    if ref_python is None:
        print(SKIPPED, flush=True)
    figures = {}
    todo = cases(args.quick, args.scale)
    if args.quick:
        prefetch([{**c["ours"], "seed": 100} for c in todo if c["ours"]["kind"] == "api"],
                 [c["ref"] for c in todo if c.get("ref")], ref_python)
    for case in todo:
        res = measure(case, repeat, ref_python)
        if case["kind"] == "cold":  # one child times both: a new home, then the same home again
            for home in ("fresh", "existing"):
                figures[f"cold_start_{home}"] = {"ours": {"seconds": res["ours"][home], "runs": res["ours"]["runs"],
                                                          "wall_s": res["ours"][f"{home}_wall_s"]},
                                                 "reference": None}
            continue
        figures[case["key"]] = res
        if args.verbose:
            print(f"  {case['key']}: {json.dumps(res)}", flush=True)
    lines = [line for key, res in figures.items() for line in row(key, res)]
    widths = [max(len(line[i]) for line in lines + [("case", "ours", "reference", "ours vs reference")])
              for i in range(4)]
    for line in [("case", "ours", "reference", "ours vs reference"), tuple("-" * w for w in widths)] + lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    report = {"repeat": repeat, "quick": args.quick, "cores": os.cpu_count(),
              "reference": {"available": ref_python is not None, "python": ref_python, "version": "0.9.7"},
              "cases": figures}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report
