"""An in-memory Store: the same protocol and the same answers as the SQL store, nothing on disk.

Used by unit tests and by the benchmark as the baseline the SQLite store is measured against.
Values are kept as DONE events carry them, JSON text, and decoded when a row group is loaded,
as the SQL store does.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Sequence

from pipeline.errors import RunExistsError, RunNotFoundError
from pipeline.store.base import (COMPLETE, DEFERRED, DONE, DROPPED, FAILED, STARTED, LoadedRowGroup, NewRun,
                                 RowGroupClaim, RunInfo)
from pipeline.values import decode
from pipeline.workers import make_owner_id, owner_is_gone

__all__ = ["MemoryStore"]

_STATE = {STARTED: "in_flight", DONE: "done", DEFERRED: "deferred", FAILED: "failed"}


class MemoryStore:
    """Thread-safe; several instances may share one ``data`` dict to act as several workers."""

    def __init__(self, data: dict | None = None, owner: str | None = None):
        self.owner = owner or make_owner_id()
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
            n_groups = math.ceil(run.num_records / run.row_group_size)
            self._data["runs"][run.run_id] = {
                "info": dict(run_id=run.run_id, name=run.name, status="running", num_records=run.num_records,
                             row_group_size=run.row_group_size, seed=run.seed, config=run.config,
                             fingerprint=run.fingerprint, created_at=now, updated_at=now, finished_at=None),
                "columns": list(run.columns),
                "groups": [dict(row_group=g, num_rows=min(run.row_group_size, run.num_records - g * run.row_group_size),
                                state="pending", rows_dropped=0, path=None, lease_owner=None, lease_epoch=0,
                                lease_expires_at=None) for g in range(n_groups)],
                "tasks": {},  # (rg, generator, row_index) -> dict
                "by_rg": {},  # rg -> keys of its tasks, so that compaction is O(row group)
                "dropped": {},  # rg -> set of row indexes
                "workers": {},
                "usage": {},  # (model, generator) -> dict
            }

    def get_run(self, run_id: str) -> RunInfo:
        with self._lock:
            return RunInfo(**self._run(run_id)["info"])

    def list_runs(self) -> list[RunInfo]:
        with self._lock:
            infos = [RunInfo(**r["info"]) for r in self._data["runs"].values()]
        return sorted(infos, key=lambda i: i.created_at, reverse=True)

    def set_run_status(self, run_id: str, status: str) -> None:
        with self._lock:
            info = self._run(run_id)["info"]
            info["status"] = status
            info["updated_at"] = time.time()
            if status == "complete":
                info["finished_at"] = info["updated_at"]

    # -- workers and leases ---------------------------------------------------------------
    def register_worker(self, run_id: str) -> None:
        with self._lock:
            self._run(run_id)["workers"][self.owner] = time.time()

    def unregister_worker(self, run_id: str) -> None:
        with self._lock:
            self._run(run_id)["workers"].pop(self.owner, None)

    def live_workers(self, run_id: str) -> int:
        with self._lock:
            return sum(1 for o in self._run(run_id)["workers"] if not owner_is_gone(o))

    def claim_row_groups(self, run_id: str, limit: int, lease_s: float) -> list[RowGroupClaim]:
        now = time.time()
        claims = []
        with self._lock:
            for g in self._run(run_id)["groups"]:
                if len(claims) >= limit:
                    break
                if g["state"] == "checkpointed" or g["lease_owner"] == self.owner:
                    continue
                free = (g["lease_owner"] is None or (g["lease_expires_at"] or 0) < now
                        or owner_is_gone(g["lease_owner"]))
                if not free:
                    continue
                before = g["state"]
                g.update(lease_owner=self.owner, lease_epoch=g["lease_epoch"] + 1,
                         lease_expires_at=now + lease_s, state="active" if before == "pending" else before)
                self._epochs[(run_id, g["row_group"])] = g["lease_epoch"]
                claims.append(RowGroupClaim(g["row_group"], g["num_rows"], g["lease_epoch"], before))
        return claims

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
            out = LoadedRowGroup(row_group, run["groups"][row_group]["num_rows"])
            out.dropped = set(run["dropped"].get(row_group, ()))
            for (rg, gen, r), t in run["tasks"].items():
                if rg != row_group:
                    continue
                if t["state"] == "done":
                    out.done[(gen, r)] = decode(t["value"])
                elif t["state"] == "deferred":
                    out.deferred[(gen, r)] = (t["attempts"], t["next_eligible_at"], t["last_error"])
                else:
                    out.attempts[(gen, r)] = t["attempts"]
            return out

    # -- journal --------------------------------------------------------------------------
    def record(self, run_id: str, events: Sequence[tuple]) -> set[int]:
        lost: set[int] = set()
        now = time.time()
        with self._lock:
            run = self._run(run_id)
            tasks, groups = run["tasks"], run["groups"]
            ok: dict[int, bool] = {}
            for ev in events:
                rg = ev[1]
                held = ok.get(rg)
                if held is None:
                    held = ok[rg] = self._holds(run, run_id, rg)
                    if not held:
                        lost.add(rg)
                if not held:
                    continue
                kind = ev[0]
                if kind == DROPPED:
                    rows = range(groups[rg]["num_rows"]) if ev[3] is None else (ev[3],)
                    dropped = run["dropped"].setdefault(rg, set())
                    dropped.update(rows)
                    groups[rg]["rows_dropped"] = len(dropped)
                    continue
                if kind == COMPLETE:
                    groups[rg]["state"] = "complete"
                    continue
                key = (rg, ev[2], ev[3])
                t = tasks.get(key)
                if t is None:
                    t = tasks[key] = dict(task_type=ev[4], attempts=0, next_eligible_at=None, last_error=None,
                                          value=None)
                    run["by_rg"].setdefault(rg, set()).add(key)
                t["state"] = _STATE[kind]
                t["updated_at"] = now
                if kind == DONE:
                    t["value"] = ev[5]
                elif kind == DEFERRED:
                    t["attempts"], t["next_eligible_at"], t["last_error"] = ev[5]
                elif kind == FAILED:
                    t["attempts"], t["last_error"] = ev[5]
                if len(ev) > 6:  # model usage of this attempt
                    model, n, p, c, limited, concurrency = ev[6]
                    u = self._usage_row(run, model, ev[2])
                    for k, v in (("requests", n), ("prompt_tokens", p), ("completion_tokens", c)):
                        u[k] += v
                        t[k] = (t.get(k) or 0) + v
                    u["rate_limited"] += limited
                    u["concurrency"] = concurrency
        for rg in lost:
            self._epochs.pop((run_id, rg), None)
        return lost

    def checkpoint_row_group(self, run_id: str, row_group: int, path: str | None, rows_dropped: int) -> bool:
        with self._lock:
            run = self._run(run_id)
            if not self._holds(run, run_id, row_group):
                return False
            run["groups"][row_group].update(state="checkpointed", path=path, rows_dropped=rows_dropped,
                                            lease_owner=None, lease_expires_at=None)
            tasks = run["tasks"]
            for key in run["by_rg"].pop(row_group, ()):
                if tasks[key]["state"] != "failed":
                    del tasks[key]
            run["dropped"].pop(row_group, None)
            self._epochs.pop((run_id, row_group), None)
            return True

    # -- reading --------------------------------------------------------------------------
    def row_groups(self, run_id: str) -> list[dict]:
        with self._lock:
            return [dict(g) for g in self._run(run_id)["groups"]]

    def column_counts(self, run_id: str) -> dict[str, dict[str, int]]:
        with self._lock:
            run = self._run(run_id)
            groups, dropped = run["groups"], run["dropped"]
            per_gen: dict[str, dict[str, int]] = {}
            for (rg, gen, r), t in run["tasks"].items():
                c = per_gen.setdefault(gen, {"done": 0, "failed": 0, "deferred": 0, "in_flight": 0})
                g = groups[rg]
                if t["state"] == "failed":
                    c["failed"] += 1 if r is not None else g["num_rows"]
                    continue
                if g["state"] == "checkpointed" or t["state"] not in c:
                    continue
                if r is None:
                    c[t["state"]] += g["num_rows"] - len(dropped.get(rg, ()))
                elif r not in dropped.get(rg, ()):
                    c[t["state"]] += 1
            done_ck = sum(g["num_rows"] - g["rows_dropped"] for g in groups if g["state"] == "checkpointed")
            out = {}
            for col in sorted(run["columns"], key=lambda c: c.position):
                c = dict(per_gen.get(col.generator, {"done": 0, "failed": 0, "deferred": 0, "in_flight": 0}))
                c["done"] += done_ck
                out[col.column_name] = c
            return out

    @staticmethod
    def _usage_row(run: dict, model: str, generator: str) -> dict:
        return run["usage"].setdefault((model, generator), {
            "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "rate_limited": 0, "concurrency": None,
            "calls_saved": 0})

    def model_usage(self, run_id: str) -> dict[str, dict[str, int]]:
        with self._lock:
            out: dict[str, dict] = {}
            for (model, _), u in sorted(self._run(run_id)["usage"].items()):
                m = out.setdefault(model, {k: 0 for k in u} | {"concurrency": None})
                for k, v in u.items():
                    if k == "concurrency":
                        m[k] = v if v is not None else m[k]
                    else:
                        m[k] += v
            return out

    def add_calls_saved(self, run_id: str, saved: dict[tuple[str, str], int]) -> None:
        with self._lock:
            run = self._run(run_id)
            for (model, generator), n in saved.items():
                if n:
                    self._usage_row(run, model, generator)["calls_saved"] += n

    def close(self) -> None:
        pass
