"""Changing a run's config (CONTRACT section 11): `pipeline resume RUN_ID --config FILE [--plan]`
and `pipeline run FILE --reuse RUN_ID`.

Which cells a change keeps is decided per generator from the column fingerprints
(:mod:`pipeline.fingerprints`), which fold in the fingerprints of the columns a generator reads:

- ``keep``: the run recorded the same fingerprint: its recorded cells are kept;
- ``changed``: its own definition changed (config entry, model, python module, seed file, seed);
  the reason names which;
- ``reads``: its definition is the same but a column it reads (directly or not) changed;
- ``new``: the run did not have it (or recorded no fingerprint for it).

Every cell of a ``changed``, ``reads`` or ``new`` generator is computed again, in every row
group; the rest is kept. The store plans and applies the change row group by row group, in one
transaction (:mod:`pipeline.store.change_plan`, :mod:`pipeline.store.change_sql`); the plan
(``--plan``) is the same computation, written nowhere.

``--reuse`` copies into a new run every recorded cell of the earlier run whose generator has the
same fingerprint in both runs, by record index: the same fingerprint means the same definition
and the same definitions upstream, so for the same record the same inputs (deterministic
generators).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from pipeline.errors import ConfigError, StoreError
from pipeline.fingerprints import COLUMN, FILE, column_digests, fingerprints
from pipeline.store.base import ColumnSpec, Lineage, RunInfo, Store
from pipeline.store.change_plan import ChangeResult, ConfigChange

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig

__all__ = ["ChangePlan", "apply_change", "file_reader", "lineage", "plan_change", "reuse_cells"]

KEEP, CHANGED, READS, NEW = "keep", "changed", "reads", "new"
_OWN = (("model", "model changed"), ("module", "python module changed"), ("seed_file", "seed file changed"),
        ("seed", "seed changed"), ("row_group_size", "row_group_size changed"))


@dataclass
class ChangePlan:
    """What `resume --config` keeps and computes. ``columns``: ``{output column: {"keep",
    "compute", "reason"}}`` in the new config's order (``--plan --json`` prints exactly
    ``{"columns": columns}``)."""

    run_id: str
    columns: dict[str, dict[str, Any]]
    removed: list[str]  # output columns that leave the export
    num_records: tuple[int, int]  # before, after
    changed: bool  # False: the config is the run's own
    result: ChangeResult = field(default_factory=ChangeResult)

    def to_json(self) -> dict[str, Any]:
        return {"columns": self.columns}

    def to_text(self) -> str:
        width = max([len(c) for c in self.columns] + [6])
        lines = [f"run {self.run_id}: " + ("the config is the run's own; nothing changes" if not self.changed
                                           else "changes under the new config")]
        before, after = self.num_records
        if before != after:
            lines.append(f"num_records: {before:,} -> {after:,}")
        lines.append(f"{'column':<{width}}  {'keep':>10} {'compute':>10}  reason")
        for name, c in self.columns.items():
            lines.append(f"{name:<{width}}  {c['keep']:>10,} {c['compute']:>10,}  {c['reason']}")
        for name in self.removed:
            lines.append(f"{name:<{width}}  {'-':>10} {'-':>10}  removed from the config: leaves the export")
        return "\n".join(lines)


def lineage(graph: Any) -> Lineage:
    """The DAG as the store's planners need it: transitive upstream and downstream per generator."""
    upstream: dict[str, frozenset[str]] = {}
    for node in graph.nodes:  # topological order: upstreams first
        ups = set(node.upstream)
        for u in node.upstream:
            ups |= upstream[u]
        upstream[node.name] = frozenset(ups)
    downstream = {n.name: frozenset(m for m, ups in upstream.items() if n.name in ups) for n in graph.nodes}
    return Lineage(outputs={n.name: n.outputs for n in graph.nodes},
                   task_types={n.name: n.task_type for n in graph.nodes},
                   upstream=upstream, downstream=downstream)


def file_reader(home: Path, run_id: str) -> Callable[[str], Mapping[str, list]]:
    """``read(path)``: a row-group file of the run as ``{column: [values]}``; StoreError when it
    cannot be read."""
    from pipeline.dataset import read_row_group

    def read(path: str) -> Mapping[str, list]:
        try:
            return read_row_group(home / path)
        except (OSError, ValueError) as exc:  # pyarrow's errors are OSError/ArrowInvalid (ValueError)
            raise StoreError(f"run {run_id}: its row-group file {home / path} cannot be read ({exc}); "
                             f"`pipeline resume {run_id} --repair` computes it again") from exc
    return read


def _statuses(old_cfg: PipelineConfig, stored: dict[tuple[str, str], str], new_cfg: PipelineConfig, graph: Any,
              new_prints: dict[tuple[str, str], str]) -> dict[str, tuple[str, str]]:
    """``{generator of the new config: (status, reason)}`` (see the module docstring)."""
    from pipeline.graph import build_graph

    old_facts: dict[str, dict] = {}
    try:
        old_files = {name: d for (kind, name), d in stored.items() if kind == FILE}
        old_facts = {gen: facts for gen, (facts, _) in column_digests(old_cfg, build_graph(old_cfg),
                                                                      old_files).items()}
    except Exception:  # only the reasons' detail depends on it
        pass
    new_facts = {gen: facts for gen, (facts, _) in column_digests(
        new_cfg, graph, {name: d for (kind, name), d in new_prints.items() if kind == FILE}).items()}
    out: dict[str, tuple[str, str]] = {}
    for node in graph.nodes:  # topological: producers first
        gen = node.name
        old, new = stored.get((COLUMN, gen)), new_prints[(COLUMN, gen)]
        if old is None:
            known = any(c.name == gen for c in old_cfg.columns)
            out[gen] = (NEW, "no fingerprint recorded for it" if known else "new column")
            continue
        if old == new:
            out[gen] = (KEEP, "unchanged")
            continue
        own = []
        of, nf = old_facts.get(gen), new_facts[gen]
        if of is not None:
            if of["entry"] != nf["entry"]:
                keys = sorted(k for k in {**of["entry"], **nf["entry"]} if of["entry"].get(k) != nf["entry"].get(k))
                own.append(f"entry changed ({', '.join(keys)})")
            own += [label for key, label in _OWN if of.get(key) != nf.get(key)]
        reads = [c for c in node.depends_on if graph.producer[c] != gen and out[graph.producer[c]][0] != KEEP]
        if reads and not own:
            out[gen] = (READS, f"reads a changed column: {', '.join(reads)}")
        else:
            reason = "; ".join(own) or "definition changed"
            out[gen] = (CHANGED, reason + (f"; reads a changed column: {', '.join(reads)}" if reads else ""))
    return out


def build_change(store: Store, info: RunInfo, new_cfg: PipelineConfig) -> tuple[ConfigChange, ChangePlan, Any]:
    """The change of run ``info`` to ``new_cfg``, and its plan without the counts. ConfigError
    when the row groups would be cut differently."""
    from pipeline.config import config_from_json
    from pipeline.graph import build_graph

    old_cfg = config_from_json(info.config, usable=False)  # compared, not run
    if new_cfg.row_group_size != info.row_group_size:
        raise ConfigError(f"row_group_size cannot change in a run ({info.row_group_size} -> "
                          f"{new_cfg.row_group_size}): its recorded cells are cut in row groups of "
                          f"{info.row_group_size}. Keep it, or start a new run that takes every cell it can "
                          f"from this one: `pipeline run FILE --reuse {info.run_id}`", path=new_cfg.source)
    graph = build_graph(new_cfg)
    new_prints = fingerprints(new_cfg, graph)
    stored = store.run_fingerprints(info.run_id)
    statuses = _statuses(old_cfg, stored, new_cfg, graph, new_prints)
    old_gens = {c.name for c in old_cfg.columns}
    removed_gens = sorted(old_gens - set(statuses))
    added = frozenset(g for g in statuses if g not in old_gens)
    recompute = frozenset(g for g, (status, _) in statuses.items() if status != KEEP)
    grew = new_cfg.num_records - info.num_records
    rows: list[tuple[str, str, str | None, str | None, str]] = []
    for gen, (status, reason) in statuses.items():
        if status != KEEP:
            rows.append((COLUMN, gen, stored.get((COLUMN, gen)), new_prints[(COLUMN, gen)], reason))
    for gen in removed_gens:
        rows.append((COLUMN, gen, stored.get((COLUMN, gen)), None, "removed from the config"))
    new_text = new_cfg.to_json()
    changed = bool(new_text != info.config or recompute or removed_gens)
    if changed:
        what = [f"num_records {info.num_records:,} -> {new_cfg.num_records:,}"] if grew else []
        what += [f"{label}: {', '.join(gens)}" for label, gens in (
            ("added", sorted(added)), ("removed", removed_gens),
            ("computed again", sorted(recompute - added))) if gens]
        rows.insert(0, ("config", new_cfg.source or new_cfg.name, info.fingerprint, new_cfg.fingerprint(),
                        "resume --config: " + ("; ".join(what) or "settings only")))
    change = ConfigChange(
        num_records=new_cfg.num_records, row_group_size=new_cfg.row_group_size, config=new_text,
        fingerprint=new_cfg.fingerprint(),
        columns=[ColumnSpec(c, graph.producer[c], graph.by_name[graph.producer[c]].strategy, i)
                 for i, c in enumerate(graph.columns)],
        fingerprints=[(kind, name, digest) for (kind, name), digest in sorted(new_prints.items())],
        lineage=lineage(graph), recompute=recompute, removed=frozenset(removed_gens),
        per_record=frozenset(c.name for c in new_cfg.columns if c.type in ("sampler", "seed_dataset")),
        added=added, changes=rows)
    removed_cols = [c for c in old_cfg.output_columns() if c not in graph.producer]
    plan = ChangePlan(info.run_id, {}, removed_cols, (info.num_records, new_cfg.num_records), changed)
    for col in graph.columns:
        status, reason = statuses[graph.producer[col]]
        if status == KEEP and grew > 0:
            reason += f"; {grew:,} new records"
        plan.columns[col] = {"keep": 0, "compute": 0, "reason": reason}
    return change, plan, graph


def _counted(plan: ChangePlan, result: ChangeResult, graph: Any) -> ChangePlan:
    plan.result = result
    for col, entry in plan.columns.items():
        gen = graph.producer[col]
        entry["keep"], entry["compute"] = result.keep.get(gen, 0), result.compute.get(gen, 0)
    return plan


def plan_change(store: Store, info: RunInfo, new_cfg: PipelineConfig, home: Path) -> ChangePlan:
    """What applying ``new_cfg`` would keep and compute; writes nothing."""
    change, plan, graph = build_change(store, info, new_cfg)
    result = store.apply_config_change(info.run_id, change, read_file=file_reader(home, info.run_id), dry_run=True)
    return _counted(plan, result, graph)


def apply_change(store: Store, info: RunInfo, new_cfg: PipelineConfig, home: Path) -> ChangePlan:
    """Apply ``new_cfg`` to the run in one transaction (nothing when it is the run's own config).
    RunInUseError (nothing changed) when live workers hold the run."""
    change, plan, graph = build_change(store, info, new_cfg)
    if not plan.changed:
        result = store.apply_config_change(info.run_id, change, read_file=file_reader(home, info.run_id),
                                           dry_run=True)
        return _counted(plan, result, graph)
    result = store.apply_config_change(info.run_id, change, read_file=file_reader(home, info.run_id))
    for path in result.removed_paths:  # after the commit: files of row groups past the new end
        try:
            (home / path).unlink()
        except OSError:
            pass
    return _counted(plan, result, graph)


def reuse_cells(store: Store, source: str, target: str, cfg: PipelineConfig, graph: Any,
                prints: dict[tuple[str, str], str], home: Path) -> dict[str, int]:
    """`run --reuse`: copy into the new run ``target`` what run ``source`` recorded of every
    generator with the same fingerprint (stateful ones excepted: their state runs through the
    row groups in order). Returns ``{generator: records copied}``."""
    stored = store.run_fingerprints(source)
    same = {n.name: (n.task_type, n.outputs) for n in graph.nodes
            if not n.stateful and stored.get((COLUMN, n.name)) == prints[(COLUMN, n.name)]}
    return store.copy_cells(source, target, same, read_file=file_reader(home, source))
