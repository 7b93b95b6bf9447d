"""No import circle in `pipeline/`: the imports of every module, read with ast (at module level,
inside functions, and under ``if TYPE_CHECKING:``, since a circle of types is a circle of design
too), make a graph without a cycle but the one allowed below."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (importer, imported) module-name prefixes of import edges that may close a circle, while one
#: is being taken apart (test_every_allowed_circle_still_exists fails once it is gone, as a
#: reminder to remove its entry). None now.
ALLOWED: list[tuple[str, str]] = []


def modules() -> dict[str, Path]:
    """``{dotted module name: file}`` of the package."""
    found = {}
    for path in (ROOT / "pipeline").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports. Importing ``a.b.c`` runs the package ``a.b``
    first, so that is an edge too; a module's own packages (always loaded before it) and the
    root package (the public facade, which imports the API) are not."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in known}
            out |= subs
            if module in known and len(subs) < len(node.names):
                out.add(module)
    for module in list(out):
        parts = module.split(".")
        out.update(".".join(parts[:i]) for i in range(2, len(parts)))
    own = name.split(".")
    return out - {".".join(own[:i]) for i in range(1, len(own) + 1)}


def import_graph(allowed=()) -> dict[str, set[str]]:
    known = modules()
    graph = {name: imports_of(name, path, known) for name, path in known.items()}
    for importer, imported in allowed:
        for name, edges in graph.items():
            if name.startswith(importer):
                graph[name] = {m for m in edges if not m.startswith(imported)}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_walk_sees_the_imports():
    graph = import_graph()
    assert {"pipeline.engine.scheduler", "pipeline.store.base"} <= graph["pipeline.api"] | {
        m for dep in graph["pipeline.api"] for m in graph[dep]}
    assert "pipeline.store.base" in graph["pipeline.store.memory"]


def test_no_import_circle_in_the_package():
    assert circles(import_graph(ALLOWED)) == []


def test_every_allowed_circle_still_exists():
    """When this fails, the circle is gone: remove its entry from ALLOWED."""
    found = circles(import_graph())
    for importer, imported in ALLOWED:
        assert any(any(m.startswith(importer) for m in c) and any(m.startswith(imported) for m in c)
                   for c in found), f"{importer} -> {imported} closes no circle any more"


def test_a_circle_is_found():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_config_loads_without_numpy_or_pandas(tmp_path):
    """Importing pipeline.config, and loading a config with no seed file, loads neither numpy nor
    pandas (a fresh interpreter: this one has them already)."""
    (tmp_path / "c.yaml").write_text(textwrap.dedent("""\
        name: light
        num_records: 10
        models:
          m: {base_url: "http://127.0.0.1:1/v1", model: m}
        columns:
          - {name: n, type: sampler, sampler: integer, params: {low: 1, high: 5}}
          - {name: t, type: llm_text, model: m, prompt: "say {{ n }}"}
        """))
    code = textwrap.dedent(f"""\
        import json, sys
        import pipeline.config
        first = sorted(m for m in ("numpy", "pandas", "pyarrow") if m in sys.modules)
        config = pipeline.config.load_config({str(tmp_path / "c.yaml")!r})
        config.fingerprint()
        then = sorted(m for m in ("numpy", "pandas", "pyarrow") if m in sys.modules)
        print(json.dumps([first, then, config.output_columns()]))
        """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[], [], ["n", "t"]]


def test_a_run_reaches_its_first_cell_without_pandas_pyarrow_or_jinja2(tmp_path):
    """`pipeline run` of a sampler, a python cell and a batch column: pandas, pyarrow and jinja2
    (about 250 ms of start-up together) are not loaded when the first cell runs, as a sampler is
    given record indexes and nothing else needs them yet; the batch column still gets its
    DataFrame, and the file is written (issue 12's cold start)."""
    (tmp_path / "cold_fns.py").write_text(textwrap.dedent("""\
        import json, sys
        _seen = []

        def cell(row):
            if not _seen:
                _seen.append(sorted(m for m in ("pandas", "pyarrow", "jinja2") if m in sys.modules))
            return row["n"] * 2

        def sink(frame):
            import pandas
            assert isinstance(frame, pandas.DataFrame), type(frame)
            with open("first_cell.json", "w") as f:
                json.dump(_seen[0], f)
            return [len(frame)] * len(frame)
        """))
    (tmp_path / "c.yaml").write_text(textwrap.dedent("""\
        name: cold
        num_records: 20
        columns:
          - {name: n, type: sampler, sampler: integer, params: {low: 1, high: 5}}
          - {name: d, type: python, function: 'cold_fns:cell', requires: [n]}
          - {name: s, type: python, function: 'cold_fns:sink', mode: batch, requires: [d]}
        """))
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "c.yaml", "--run-id", "c", "--quiet",
                           "--home", "home"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "first_cell.json").read_text()) == []
    assert "20 of 20 records written" in done.stdout + done.stderr
