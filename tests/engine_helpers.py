"""Build and run small pipelines straight on the engine, with hand-made generators (AsyncFn,
SyncFn, index_root)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from pipeline.engine.scheduler import Scheduler, SchedulerOptions
from pipeline.generators.base import Generator
from pipeline.engine.tracker import Plan
from pipeline.graph import build_graph
from pipeline.store.base import ColumnSpec, NewRun
from pipeline.store.memory import MemoryStore


class AsyncFn(Generator):
    def __init__(self, fn, strategy="cell", stateful=False):
        self.fn, self.strategy, self.is_stateful = fn, strategy, stateful

    async def agenerate(self, data):
        out = self.fn(data)
        if asyncio.iscoroutine(out):
            out = await out
        return out


class SyncFn(Generator):
    def __init__(self, fn, strategy="cell"):
        self.fn, self.strategy = fn, strategy

    def generate(self, data):
        return self.fn(data)


def index_root():
    return AsyncFn(lambda df: list(df.index), "batch")


def spec(name, strategy="cell", deps=(), outputs=None, stateful=False):
    return SimpleNamespace(name=name, type="python", outputs=tuple(outputs or (name,)),
                           dependencies=tuple(deps), strategy=strategy, stateful=stateful)


def make_run(specs, gens, *, num_records, row_group_size, home, store=None, run_id="r1", **options):
    graph = build_graph(SimpleNamespace(columns=specs, source=None))
    for s in specs:
        gens[s.name].outputs = s.outputs
        gens[s.name].strategy = s.strategy
    store = store or MemoryStore()
    try:
        store.get_run(run_id)
    except Exception:
        store.create_run(NewRun(run_id, "t", num_records, row_group_size, 0, "{}", "fp",
                                [ColumnSpec(c, graph.producer[c], "cell", i) for i, c in enumerate(graph.columns)]))
    options.setdefault("retry_backoff_s", 0.01)
    options.setdefault("commit_interval_s", 0.002)
    sched = Scheduler(Plan(graph, gens), store, run_id, num_records=num_records, row_group_size=row_group_size,
                      home=str(home), options=SchedulerOptions(**options))
    return sched, store


def run_engine(specs, gens, **kw):
    sched, store = make_run(specs, gens, **kw)
    status = asyncio.run(asyncio.wait_for(sched.run(), 30))
    return status, sched, store


def dataset(store, home, run_id="r1"):
    import pandas as pd
    import pyarrow.parquet as pq

    frames = [pq.read_table(f"{home}/{g['path']}").to_pandas() for g in store.row_groups(run_id)
              if g["state"] == "checkpointed" and g["path"]]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
