"""How long the commands that only read take, each in a fresh process, as a user meets them.

    python scripts/command_times.py                  # a 200-record quickstart run in a temp home
    python scripts/command_times.py --records 2000 --repeat 7
    python scripts/command_times.py --home .pipeline --run-id my-run   # an existing store
    python scripts/command_times.py --importtime     # also: the slowest imports of `status`

Each command runs ``--repeat`` times (default 5) as ``python -m pipeline.cli ...`` in a new
subprocess from the repository root, and the median wall time (seconds, process start to exit)
is printed. The store is made current first (``pipeline db upgrade``), so that the figures are
those of a store at the newest schema revision.
"""

from __future__ import annotations

import argparse
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


def child_env() -> dict[str, str]:
    """The environment of a command as a user runs it: no PIPELINE_* variables, this tree first
    on the path, and compiled bytecode cached (in PYCACHE, outside the tree) even where
    PYTHONDONTWRITEBYTECODE is set, as an installed package has it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_") and k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONPYCACHEPREFIX"] = PYCACHE
    return env


PYCACHE = os.path.join(tempfile.gettempdir(), "pipeline-command-times-pycache")


def cli(args: list[str], home: Path, *, check: bool = True) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``pipeline ARGS --home HOME`` once; (wall seconds, CPU seconds (user + system) of the
    child, the finished process). On a loaded machine the CPU figure is the steadier one."""
    env = child_env()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    where = [] if args == ["--help"] else ["--home", str(home)]
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args, *where], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    took = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if check and proc.returncode != 0:
        raise SystemExit(f"pipeline {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}")
    return took, cpu, proc


def commands(run_id: str, out: Path) -> list[tuple[str, list[str]]]:
    return [
        ("pipeline --help", ["--help"]),
        ("pipeline status RUN", ["status", run_id]),
        ("pipeline status RUN --json", ["status", run_id, "--json"]),
        ("pipeline runs", ["runs"]),
        ("pipeline runs --json", ["runs", "--json"]),
        ("pipeline sql 'select ...'", ["sql", "select run_id, status from runs"]),
        ("pipeline export RUN (jsonl)", ["export", run_id, "--output", str(out / "out.jsonl")]),
        ("pipeline export RUN (parquet)", ["export", run_id, "--output", str(out / "out.parquet")]),
        ("pipeline db current", ["db", "current"]),
    ]


def slowest_imports(run_id: str, home: Path, most: int = 12) -> list[tuple[int, str]]:
    """The top-level imports of `pipeline status` with the largest cumulative time (us)."""
    env = child_env()
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline.cli", "status", run_id,
                           "--home", str(home)], cwd=ROOT, env=env, capture_output=True, text=True)
    rows = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        if name[1:2] == " ":  # nested: only the top level (one space before the name)
            continue
        rows.append((int(cumulative), name.strip()))
    return sorted(rows, reverse=True)[:most]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", type=Path, default=None, help="An existing home (default: a new one).")
    parser.add_argument("--run-id", default="small", help="The run to read (made when --home is not given).")
    parser.add_argument("--records", type=int, default=200, help="Records of the run made (default 200).")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    parser.add_argument("--importtime", action="store_true", help="Also list the slowest imports of `status`.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pipeline-times-") as tmp:
        out = Path(tmp)
        home = args.home
        if home is None:
            home = out / "home"
            cli(["run", str(ROOT / "examples" / "quickstart.yaml"), "--run-id", args.run_id, "--num-records",
                 str(args.records), "--quiet"], home)
        cli(["db", "upgrade"], home)
        figures = {}
        for label, argv in commands(args.run_id, out):
            cli(argv, home)  # warm the file cache once
            times = [cli(argv, home)[:2] for _ in range(args.repeat)]
            figures[label] = {"wall_s": statistics.median(t[0] for t in times),
                              "cpu_s": statistics.median(t[1] for t in times)}
        if args.json:
            print(json.dumps(figures, indent=2))
        else:
            print(f"| command | wall (s, median of {args.repeat}) | CPU (s) |\n|---|---:|---:|")
            for label, f in figures.items():
                print(f"| `{label}` | {f['wall_s']:.3f} | {f['cpu_s']:.3f} |")
        if args.importtime:
            print("\nslowest top-level imports of `pipeline status` (cumulative ms):")
            for us, name in slowest_imports(args.run_id, home):
                print(f"  {us / 1000:8.1f}  {name}")


if __name__ == "__main__":
    main()
