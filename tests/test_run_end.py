"""The end of a run as readers see it: a run never looks interrupted while it finishes."""

from __future__ import annotations

import asyncio

from pipeline.generators.base import Generator
from tests.engine_helpers import make_run, spec


class Fn(Generator):
    def __init__(self, fn, strategy="cell"):
        self.fn, self.strategy = fn, strategy

    async def agenerate(self, data):
        return self.fn(data)


def test_a_finished_run_is_complete_before_its_worker_leaves(tmp_path):
    """`pipeline status` shows a running run with no live worker as interrupted, and `status
    --watch` stops there: the worker must record the run's end before it unregisters."""
    sched, store = make_run([spec("i", "batch"), spec("v", deps=["i"])],
                            {"i": Fn(lambda df: list(df.index), "batch"), "v": Fn(lambda row: row["i"])},
                            num_records=20, row_group_size=10, home=tmp_path)
    seen = []
    unregister = store.unregister_worker

    def watching(run_id):
        seen.append(store.get_run(run_id).status)
        return unregister(run_id)

    store.unregister_worker = watching
    assert asyncio.run(asyncio.wait_for(sched.run(), 60)) == "complete"
    assert seen == ["complete"]
