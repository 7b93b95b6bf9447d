"""An in-memory Store: the same protocol and the same answers as the SQL store, nothing on disk.

Used by unit tests and by the benchmark as the baseline the SQLite store is measured against.
Values are kept as DONE events carry them, JSON text, and decoded when a row group is loaded,
as the SQL store does.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Collection, Mapping, Sequence

from pipeline import values
from pipeline.errors import RunExistsError, RunInUseError, RunNotFoundError, StoreError
from pipeline.store.base import (ROW_GROUP_BATCH, Lineage, LoadedRowGroup, NewRun, Reopened, RowGroupClaim,
                                 RunInfo, row_group_counts)
from pipeline.states import RowGroupState, RunStatus, TaskState
from pipeline.store.events import TASK_STATE, coalesce, usage_totals
from pipeline.store.reopen import GroupState, plan_group, task_filter
from pipeline.workers import make_owner_id, owner_is_gone

__all__ = ["MemoryStore"]

# Bound once: loops below compare every task's state (an enum attribute costs a lookup each time).
_DONE, _DEFERRED, _FAILED, _CHECKPOINTED = TaskState.DONE, TaskState.DEFERRED, TaskState.FAILED, RowGroupState.CHECKPOINTED


class MemoryStore:
    """Thread-safe; several instances may share one ``data`` dict to act as several workers."""

    def __init__(self, data: dict | None = None, owner: str | None = None):
        self.owner = owner or make_owner_id()
        self.row_group_batch = ROW_GROUP_BATCH
        self._data = data if data is not None else {"runs": {}, "lock": threading.RLock()}
        self._lock = self._data["lock"]
        self._epochs: dict[tuple[str, int], int] = {}

    def _run(self, run_id: str) -> dict:
        try:
            return self._data["runs"][run_id]
        except KeyError:
            raise RunNotFoundError(f"no run '{run_id}'; `pipeline runs` lists the runs") from None

    # -- runs -----------------------------------------------------------------------------
    def create_run(self, run: NewRun) -> None:
        with self._lock:
            if run.run_id in self._data["runs"]:
                raise RunExistsError(f"run id '{run.run_id}' is taken; choose another --run-id")
            now = time.time()
            self._data["runs"][run.run_id] = {
                "info": dict(run_id=run.run_id, name=run.name, status=RunStatus.RUNNING, num_records=run.num_records,
                             row_group_size=run.row_group_size, seed=run.seed, config=run.config,
                             fingerprint=run.fingerprint, created_at=now, updated_at=now, finished_at=None),
                "columns": list(run.columns),
                "groups": [],  # row group i at index i; created row_group_batch at a time
                "tasks": {},  # (rg, generator, row_index) -> dict
                "by_rg": {},  # rg -> keys of its tasks, so that compaction is O(row group)
                "dropped": {},  # rg -> set of row indexes
                "workers": {},
                "usage": {},  # (model, generator) -> dict
                "truncated": {},  # generator -> kept text answers cut by length
                "states": {},  # generator -> {row group: state}
                "fingerprints": {(k, n): d for k, n, d in run.fingerprints},
                "changes": [],  # dicts, as the rows of run_changes
            }
            self._create_row_groups(self._data["runs"][run.run_id])

    def _create_row_groups(self, run: dict, at_least: int = 0) -> range:
        """Append the next row groups (``row_group_batch``, or ``at_least``), as the SQL store does."""
        info, groups = run["info"], run["groups"]
        size, n = info["row_group_size"], info["num_records"]
        created = range(len(groups), min(-(-n // size), len(groups) + max(self.row_group_batch, at_least)))
        groups.extend(dict(row_group=g, num_rows=min(size, n - g * size), state=RowGroupState.PENDING, rows_dropped=0, path=None,
                           lease_owner=None, lease_epoch=0, lease_expires_at=None, file_bytes=None,
                           file_sha256=None) for g in created)
        return created

    def get_run(self, run_id: str) -> RunInfo:
        with self._lock:
            return RunInfo(**self._run(run_id)["info"])

    def list_runs(self) -> list[RunInfo]:
        with self._lock:
            infos = [RunInfo(**r["info"]) for r in self._data["runs"].values()]
        return sorted(infos, key=lambda i: i.created_at, reverse=True)

    def record_counts(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            counts = {run_id: self.row_group_counts(run_id) for run_id in self._data["runs"]}
        return {run_id: (c["records_written"], c["records_dropped"]) for run_id, c in counts.items()}

    def delete_run(self, run_id: str) -> dict[str, int]:
        with self._lock:
            run = self._run(run_id)
            now = time.time()
            holders = {o for o in run["workers"] if not owner_is_gone(o)}
            holders |= {g["lease_owner"] for g in run["groups"] if g["lease_owner"] and g["state"] != _CHECKPOINTED
                        and (g["lease_expires_at"] or 0) >= now and not owner_is_gone(g["lease_owner"])}
            if holders:
                raise RunInUseError(f"run {run_id} is in use by {len(holders)} live worker(s); stop them first")
            del self._data["runs"][run_id]
            return {"runs": 1, "row_groups": len(run["groups"]), "tasks": len(run["tasks"])}

    def set_run_status(self, run_id: str, status: str) -> None:
        with self._lock:
            info = self._run(run_id)["info"]
            info["status"] = status
            info["updated_at"] = time.time()
            if status == RunStatus.COMPLETE:
                info["finished_at"] = info["updated_at"]

    def run_fingerprints(self, run_id: str) -> dict[tuple[str, str], str]:
        with self._lock:
            return dict(self._run(run_id)["fingerprints"])

    def replace_fingerprints(self, run_id: str, fingerprints: Sequence[tuple[str, str, str]],
                             changes: Sequence[tuple[str, str, str | None, str | None, str]]) -> None:
        with self._lock:
            run = self._run(run_id)
            run["fingerprints"] = {(k, n): d for k, n, d in fingerprints}
            now = time.time()
            for kind, name, old, new, detail in changes:
                run["changes"].append(dict(change_id=len(run["changes"]) + 1, run_id=run_id, changed_at=now,
                                           kind=kind, name=name, old_digest=old, new_digest=new, detail=detail))

    # -- workers and leases ---------------------------------------------------------------
    def run_changes(self, run_id: str) -> list[dict]:
        with self._lock:
            return [{k: c[k] for k in ("changed_at", "kind", "name", "old_digest", "new_digest", "detail")}
                    for c in self._run(run_id)["changes"]]

    def apply_config_change(self, run_id: str, change: Any, *, read_file: Any, dry_run: bool = False) -> Any:
        raise NotImplementedError("changing a run's config needs a SQL store (SQLite or PostgreSQL)")

    def copy_cells(self, source: str, target: str, generators: Any, *, read_file: Any) -> dict[str, int]:
        raise NotImplementedError("reusing a run's cells needs a SQL store (SQLite or PostgreSQL)")

    def register_worker(self, run_id: str) -> bool:
        with self._lock:
            workers = self._run(run_id)["workers"]
            workers[self.owner] = time.time()
            return not any(o != self.owner and not owner_is_gone(o) for o in workers)

    def unregister_worker(self, run_id: str) -> None:
        with self._lock:
            self._run(run_id)["workers"].pop(self.owner, None)

    def add_traces(self, run_id: str, rows: Sequence[Any]) -> None:
        with self._lock:
            self._run(run_id).setdefault("traces", []).extend(row._asdict() for row in rows)

    def traces(self, run_id: str) -> list[dict]:
        with self._lock:
            return sorted((dict(t) for t in self._run(run_id).get("traces", ())), key=lambda t: t["dispatched_at"])

    def live_workers(self, run_id: str) -> int:
        with self._lock:
            return sum(1 for o in self._run(run_id)["workers"] if not owner_is_gone(o))

    def leases(self, run_id: str) -> dict[str, list[int]]:
        now = time.time()
        held: dict[str, list[int]] = {}
        with self._lock:
            for g in self._run(run_id)["groups"]:
                if g["lease_owner"] is not None and g["state"] != _CHECKPOINTED and (g["lease_expires_at"] or 0) > now:
                    held.setdefault(g["lease_owner"], []).append(g["row_group"])
        return held

    def claim_row_groups(self, run_id: str, limit: int, lease_s: float) -> list[RowGroupClaim]:
        now = time.time()
        claims = []
        with self._lock:
            run = self._run(run_id)
            free = [g for g in run["groups"] if self._claimable(g, now)][:limit]
            if len(free) < limit:  # every created row group is taken: create the next ones
                more = self._create_row_groups(run, limit - len(free))
                free += [run["groups"][rg] for rg in more][:limit - len(free)]
            for g in free:
                before = g["state"]
                g.update(lease_owner=self.owner, lease_epoch=g["lease_epoch"] + 1,
                         lease_expires_at=now + lease_s, state=RowGroupState.ACTIVE if before == RowGroupState.PENDING else before)
                self._epochs[(run_id, g["row_group"])] = g["lease_epoch"]
                claims.append(RowGroupClaim(g["row_group"], g["num_rows"], g["lease_epoch"], before))
        return claims

    def _claimable(self, g: dict, now: float) -> bool:
        if g["state"] == _CHECKPOINTED or g["lease_owner"] == self.owner:
            return False
        return g["lease_owner"] is None or (g["lease_expires_at"] or 0) < now or owner_is_gone(g["lease_owner"])

    def _holds(self, run: dict, run_id: str, rg: int) -> bool:
        g = run["groups"][rg]
        return g["lease_owner"] == self.owner and g["lease_epoch"] == self._epochs.get((run_id, rg))

    def renew_leases(self, run_id: str, lease_s: float) -> set[int]:
        lost = set()
        with self._lock:
            run = self._run(run_id)
            run["workers"][self.owner] = time.time()
            for (rid, rg) in list(self._epochs):
                if rid != run_id:
                    continue
                if self._holds(run, run_id, rg):
                    run["groups"][rg]["lease_expires_at"] = time.time() + lease_s
                else:
                    lost.add(rg)
                    del self._epochs[(rid, rg)]
        return lost

    def release_row_groups(self, run_id: str, row_groups: Sequence[int]) -> None:
        with self._lock:
            run = self._run(run_id)
            for rg in row_groups:
                if self._holds(run, run_id, rg):
                    run["groups"][rg].update(lease_owner=None, lease_expires_at=None)
                self._epochs.pop((run_id, rg), None)

    def load_row_group(self, run_id: str, row_group: int) -> LoadedRowGroup:
        with self._lock:
            run = self._run(run_id)
            if not 0 <= row_group < len(run["groups"]):
                raise StoreError(f"run {run_id!r} has no row group {row_group}")
            out = LoadedRowGroup(row_group, run["groups"][row_group]["num_rows"])
            out.dropped = set(run["dropped"].get(row_group, ()))
            for (rg, gen, r), t in run["tasks"].items():
                if rg != row_group:
                    continue
                if t["state"] == _DONE:
                    out.done[(gen, r)] = values.decode(t["value"])
                elif t["state"] == _DEFERRED:
                    out.deferred[(gen, r)] = (t["attempts"], t["next_eligible_at"], t["last_error"])
                else:
                    out.attempts[(gen, r)] = t["attempts"]
            return out

    # -- journal --------------------------------------------------------------------------
    def record(self, run_id: str, events: Sequence[Any]) -> set[int]:
        batch = coalesce(events)  # what the SQL store writes, applied to the dicts
        now = time.time()
        with self._lock:
            run = self._run(run_id)
            tasks, groups, by_rg = run["tasks"], run["groups"], run["by_rg"]
            held = {rg for rg in batch.row_groups if self._holds(run, run_id, rg)}
            for key, ev in batch.tasks.items():
                if key[0] not in held:
                    continue
                t = tasks.get(key)
                if t is None:
                    t = tasks[key] = {"attempts": 0, "next_eligible_at": None, "last_error": None}
                    by_rg.setdefault(key[0], set()).add(key)
                t["task_type"], t["state"], t["value"] = ev.task_type, TASK_STATE[ev.kind], ev.value
                t["updated_at"] = now
                if ev.attempts is not None:  # as the SQL store keeps the message
                    t.update(attempts=ev.attempts, next_eligible_at=ev.next_eligible_at,
                             last_error=ev.error and values.valid_unicode(ev.error))
            for rg, rows in batch.dropped.items():
                if rg in held:
                    dropped = run["dropped"].setdefault(rg, set())
                    dropped.update(range(groups[rg]["num_rows"]) if rows is None else rows)
                    groups[rg]["rows_dropped"] = len(dropped)
            for (rg, generator), state in batch.states.items():
                if rg in held:
                    run["states"].setdefault(generator, {})[rg] = state
            for rg in batch.completed & held:
                groups[rg]["state"] = RowGroupState.COMPLETE
            self._add_usage(run, now, *usage_totals(batch.usage, held))
        lost = batch.row_groups - held
        for rg in lost:
            self._epochs.pop((run_id, rg), None)
        return lost

    def _add_usage(self, run: dict, now: float, per_task: dict, per_model: dict) -> None:
        for key, u in per_task.items():  # of a task's usage, only its finish_reason is ever read here
            if u.finish_reason is not None:
                run["tasks"][key]["finish_reason"] = u.finish_reason
        for (model, generator), m in per_model.items():
            row = self._usage_row(run, model, generator)
            for k in ("requests", "prompt_tokens", "completion_tokens", "rate_limited"):
                row[k] += getattr(m, k)
            row.update(concurrency=m.concurrency, updated_at=now)
            if m.cost is not None:
                row["cost"] = (row["cost"] or 0.0) + m.cost
            if m.pacing is not None:
                row["pacing"] = dict(m.pacing)
            run["truncated"][generator] = run["truncated"].get(generator, 0) + m.truncated

    def lease_epoch(self, run_id: str, row_group: int) -> int | None:
        with self._lock:
            return self._epochs.get((run_id, row_group))

    def checkpoint_row_group(self, run_id: str, row_group: int, path: str | None, rows_dropped: int, *,
                             file_bytes: int | None = None, file_sha256: str | None = None) -> bool:
        with self._lock:
            run = self._run(run_id)
            g = run["groups"][row_group]
            if not self._holds(run, run_id, row_group):
                self._epochs.pop((run_id, row_group), None)
                return g["state"] == _CHECKPOINTED and g["path"] == path
            g.update(state=_CHECKPOINTED, path=path, rows_dropped=rows_dropped, file_bytes=file_bytes,
                     file_sha256=file_sha256, lease_owner=None, lease_expires_at=None)
            # Compaction, as in the SQL store: failed rows stay; with dropped records, so do
            # those records, their done cells and the batch tasks' values (for retry).
            tasks, dropped = run["tasks"], run["dropped"].get(row_group, ())
            kept = set()
            for key in run["by_rg"].pop(row_group, ()):
                t = tasks[key]
                if t["state"] == _FAILED or (dropped and t["state"] == _DONE and (key[2] is None or key[2] in dropped)):
                    kept.add(key)
                else:
                    del tasks[key]
            if kept:
                run["by_rg"][row_group] = kept
            self._epochs.pop((run_id, row_group), None)
            return True

    def reopen_failed(self, run_id: str, lineage: Lineage, *, generators: Collection[str] | None = None,
                      error: str | None = None, read_file: Callable[[str], Mapping[str, list]]) -> Reopened:
        selected = task_filter(generators, error)
        out = Reopened()
        now = time.time()
        with self._lock:
            run = self._run(run_id)
            tasks, groups = run["tasks"], run["groups"]
            candidates = sorted({rg for (rg, gen, _), t in tasks.items()
                                 if t["state"] == _FAILED and selected(gen, t["last_error"])})
            for rg in candidates:
                g = groups[rg]
                group = GroupState(rg, g["num_rows"], g["state"], g["path"], {}, set(run["dropped"].get(rg, ())),
                                   set(), {})
                for key in run["by_rg"].get(rg, ()):
                    t = tasks[key]
                    if t["state"] == _FAILED:
                        group.failed[key[1:]] = t["last_error"]
                    elif t["state"] == _DONE:
                        group.done.add(key[1:])
                        if key[2] is None:
                            group.batch_values[key[1]] = values.decode(t["value"])
                change = plan_group(group, lineage, selected, read_file)
                if change is None:
                    continue
                keys = run["by_rg"].setdefault(rg, set())
                for gen, r in change.reopen + change.reset:
                    del tasks[(rg, gen, r)]
                    keys.discard((rg, gen, r))
                for (gen, r), (task_type, value) in change.insert.items():
                    tasks[(rg, gen, r)] = dict(task_type=task_type, state=_DONE, attempts=0, next_eligible_at=None,
                                               last_error=None, value=values.encode(value), updated_at=now)
                    keys.add((rg, gen, r))
                run["dropped"][rg] = set(change.dropped)
                g.update(state=RowGroupState.ACTIVE, rows_dropped=len(change.dropped), lease_owner=None, lease_expires_at=None,
                         lease_epoch=g["lease_epoch"] + 1)
                out.add(change)
                self._epochs.pop((run_id, rg), None)
            if out.row_groups:
                run["info"].update(status=RunStatus.RUNNING, updated_at=now, finished_at=None)
        return out

    def reopen_row_groups(self, run_id: str, row_groups: Sequence[int]) -> list[int]:
        with self._lock:
            run = self._run(run_id)
            reopened = sorted(rg for rg in set(row_groups) if run["groups"][rg]["state"] == _CHECKPOINTED)
            for rg in reopened:
                run["groups"][rg].update(state=RowGroupState.PENDING, path=None, file_bytes=None, file_sha256=None,
                                         rows_dropped=0, lease_owner=None, lease_expires_at=None)
                run["by_rg"].pop(rg, None)
                run["dropped"].pop(rg, None)
            tasks = run["tasks"]
            for key in [k for k in tasks if k[0] in set(reopened)]:  # compaction kept failed rows
                del tasks[key]
            return reopened

    # -- reading --------------------------------------------------------------------------
    def row_groups(self, run_id: str) -> list[dict]:
        with self._lock:
            return [dict(g) for g in self._run(run_id)["groups"]]

    def row_group_counts(self, run_id: str) -> dict[str, int]:
        with self._lock:
            run = self._run(run_id)
            by_state: dict[str, list] = {}
            for g in run["groups"]:
                n = by_state.setdefault(g["state"], [g["state"], 0, 0, 0])
                n[1] += 1
                n[2] += g["num_rows"] - g["rows_dropped"]
                n[3] += g["rows_dropped"]
            info = run["info"]
            return row_group_counts(info["num_records"], info["row_group_size"], by_state.values())

    def column_counts(self, run_id: str) -> dict[str, dict[str, int]]:
        with self._lock:
            run = self._run(run_id)
            groups, dropped = run["groups"], run["dropped"]
            per_gen: dict[str, dict[str, int]] = {}
            for (rg, gen, r), t in run["tasks"].items():
                c = per_gen.setdefault(gen, {"done": 0, "failed": 0, "deferred": 0, "in_flight": 0})
                g = groups[rg]
                if t["state"] == _FAILED:
                    c["failed"] += 1 if r is not None else g["num_rows"]
                    continue
                if g["state"] == _CHECKPOINTED or t["state"] not in c:
                    continue
                if r is None:
                    c[t["state"]] += g["num_rows"] - len(dropped.get(rg, ()))
                elif r not in dropped.get(rg, ()):
                    c[t["state"]] += 1
            done_ck = sum(g["num_rows"] - g["rows_dropped"] for g in groups if g["state"] == _CHECKPOINTED)
            out = {}
            for col in sorted(run["columns"], key=lambda c: c.position):
                c = dict(per_gen.get(col.generator, {"done": 0, "failed": 0, "deferred": 0, "in_flight": 0}))
                c["done"] += done_ck
                c["truncated"] = run["truncated"].get(col.generator, 0)
                out[col.column_name] = c
            return out

    def generator_states(self, run_id: str) -> dict[str, tuple[int, Any]]:
        with self._lock:
            latest = {gen: max(by_rg.items()) for gen, by_rg in self._run(run_id)["states"].items() if by_rg}
        return {gen: (rg, values.decode(text)) for gen, (rg, text) in latest.items()}

    def failed_tasks(self, run_id: str) -> list[tuple[str, str | None]]:
        with self._lock:
            return [(gen, t["last_error"]) for (_, gen, _), t in self._run(run_id)["tasks"].items()
                    if t["state"] == _FAILED]

    @staticmethod
    def _usage_row(run: dict, model: str, generator: str) -> dict:
        return run["usage"].setdefault((model, generator), {
            "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "rate_limited": 0, "concurrency": None,
            "calls_saved": 0, "cost": None, "pacing": None, "updated_at": 0.0})

    def model_usage(self, run_id: str) -> dict[str, dict[str, int]]:
        from pipeline.store.usage import merge_row

        with self._lock:
            out: dict[str, dict] = {}
            rows = sorted(self._run(run_id)["usage"].items(), key=lambda item: (item[1]["updated_at"], item[0]))
            for (model, _), u in rows:
                merge_row(out, model, u, u["pacing"])
            return dict(sorted(out.items()))

    def add_calls_saved(self, run_id: str, saved: dict[tuple[str, str], int]) -> None:
        with self._lock:
            run = self._run(run_id)
            for (model, generator), n in saved.items():
                if n:
                    self._usage_row(run, model, generator)["calls_saved"] += n

    def close(self) -> None:
        pass
