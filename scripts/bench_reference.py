"""The reference engine (DataDesigner 0.9.7's in-memory ``AsyncTaskScheduler``) on the shapes of
scripts/bench_compare.py, for the side-by-side table. Runs in the interpreter that has
``data-designer-engine`` installed (the ``bench`` extra, or a separate venv): it imports nothing
from ``pipeline``.

    python scripts/bench_reference.py '{"kind": "latency", "shape": "dual", "records": 200}'

Prints one JSON line (a list of them for a list of specs): ``{"seconds": wall of scheduler.run(), "tasks": cells + batch tasks run,
"peak_rss_mb": ..., "rss_before_mb": ...}``. The graph, tracker, generators and scheduler are
built before the clock starts (as our timing excludes imports and the store's schema); a warm-up
run of the same shape on 2 row groups comes first in the same process.

Shapes (each cell column reads the ones named; ``root`` is a from-scratch sampler, free):

- ``noop``: root, ``columns - 2`` no-op async cells reading root, one full-column sink reading
  them all (MEASUREMENTS.md's overhead shape);
- ``narrow``: root -> c0 -> c1 -> c2 -> c3; ``deep``: root -> summary -> analysis -> conclusion,
  and root -> trivia; ``wide``: 5 cells reading root; ``dual``: 3 writers reading root, each read
  by a judge. Latency cells sleep ``latency_s``; failures are decided per (column, record) by a
  hash, as in ours: ``retry_rate`` of cells raise a retryable 503 once, ``fail_rate`` fail for good.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import sys
import time
import zlib
from unittest.mock import MagicMock

#: cell columns of each latency shape: name -> the columns it reads
SHAPES = {
    "narrow": {"c0": ["root"], "c1": ["c0"], "c2": ["c1"], "c3": ["c2"]},
    "deep": {"summary": ["root"], "trivia": ["root"], "analysis": ["summary"], "conclusion": ["analysis"]},
    "wide": {f"c{i}": ["root"] for i in range(5)},
    "dual": {**{f"w{i}": ["root"] for i in range(3)}, **{f"j{i}": [f"w{i}"] for i in range(3)}},
}


def fault(column: str, key: object, retry_rate: float, fail_rate: float) -> str | None:
    """'fail', 'retry' or None for the cell (column, record key): the same rule as ours."""
    h = zlib.crc32(f"{column}:{key}".encode()) % 10_000
    if h < fail_rate * 10_000:
        return "fail"
    if h < (fail_rate + retry_rate) * 10_000:
        return "retry"
    return None


def build(spec: dict, records: int):
    import data_designer.lazy_heavy_imports as lazy
    from data_designer.config.column_configs import ExpressionColumnConfig, GenerationStrategy, SamplerColumnConfig
    from data_designer.config.sampler_params import SamplerType
    from data_designer.engine.column_generators.generators.base import (
        ColumnGenerator, ColumnGeneratorFullColumn, FromScratchColumnGenerator)
    from data_designer.engine.dataset_builders.async_scheduler import AsyncTaskScheduler
    from data_designer.engine.dataset_builders.scheduling.completion import CompletionTracker
    from data_designer.engine.dataset_builders.utils.execution_graph import ExecutionGraph
    from data_designer.engine.dataset_builders.utils.row_group_buffer import RowGroupBufferManager
    from data_designer.engine.models.errors import ModelInternalServerError
    from data_designer.engine.resources.resource_provider import ResourceProvider

    latency = spec.get("latency_s", 0.0)
    retry_rate, fail_rate = spec.get("retry_rate", 0.0), spec.get("fail_rate", 0.0)
    seen: set = set()

    class Root(FromScratchColumnGenerator[ExpressionColumnConfig]):
        counter = 0

        @staticmethod
        def get_generation_strategy():
            return GenerationStrategy.FULL_COLUMN

        def generate(self, data):
            return data

        def generate_from_scratch(self, num_records):
            start, Root.counter = Root.counter, Root.counter + num_records  # unique record keys
            return lazy.pd.DataFrame({"root": list(range(start, start + num_records))})

    class Cell(ColumnGenerator[ExpressionColumnConfig]):
        @staticmethod
        def get_generation_strategy():
            return GenerationStrategy.CELL_BY_CELL

        async def agenerate(self, data):
            name = self.config.name
            if latency:
                await asyncio.sleep(latency)
            key = data.get("root")
            kind = fault(name, key, retry_rate, fail_rate) if (retry_rate or fail_rate) else None
            if kind == "fail":
                raise ValueError("permanent failure")
            if kind == "retry" and (name, key) not in seen:
                seen.add((name, key))
                raise ModelInternalServerError("503 Service Unavailable")
            data[name] = 1
            return data

    class Sink(ColumnGeneratorFullColumn[ExpressionColumnConfig]):
        def generate(self, data):
            data[self.config.name] = 0
            return data

    if spec["shape"] == "noop":
        cells = {f"c{i}": ["root"] for i in range(spec["columns"] - 2)}
        sink = ["sink"]
    else:
        cells, sink = SHAPES[spec["shape"]], []
    provider = MagicMock(spec=ResourceProvider)
    configs = [SamplerColumnConfig(name="root", sampler_type=SamplerType.CATEGORY, params={"values": ["A"]})]
    strategies = {"root": GenerationStrategy.FULL_COLUMN}
    generators = {"root": Root(config=ExpressionColumnConfig(name="root", expr="{{ x }}"), resource_provider=provider)}
    for name, reads in cells.items():
        cfg = ExpressionColumnConfig(name=name, expr=" ".join(f"{{{{ {r} }}}}" for r in reads))
        configs.append(cfg)
        strategies[name] = GenerationStrategy.CELL_BY_CELL
        generators[name] = Cell(config=cfg, resource_provider=provider)
    for name in sink:
        cfg = ExpressionColumnConfig(name=name, expr=" ".join(f"{{{{ {r} }}}}" for r in cells))
        configs.append(cfg)
        strategies[name] = GenerationStrategy.FULL_COLUMN
        generators[name] = Sink(config=cfg, resource_provider=provider)
    graph = ExecutionGraph.create(configs, strategies)
    size = spec["row_group_size"]
    row_groups = [(i, min(size, records - i * size)) for i in range(-(-records // size))]
    tracker = CompletionTracker.with_graph(graph, row_groups)
    storage = MagicMock()
    storage.dataset_name = "bench"
    storage.get_file_paths.return_value = {}
    storage.write_batch_to_parquet_file.return_value = "/fake.parquet"
    storage.move_partial_result_to_final_file_path.return_value = "/fake_final.parquet"
    scheduler = AsyncTaskScheduler(
        generators=generators, graph=graph, tracker=tracker, row_groups=row_groups,
        buffer_manager=RowGroupBufferManager(storage),
        max_concurrent_row_groups=spec["row_groups_at_once"], max_in_flight_tasks=spec["in_flight"],
        num_records=records, buffer_size=size, disable_early_shutdown=True)
    tasks = len(row_groups) * (1 + len(sink)) + records * len(cells)
    return scheduler, tasks


def main() -> None:
    logging.disable(logging.CRITICAL)  # its per-row-group progress lines are not part of the figure
    spec = json.loads(sys.argv[1])
    if isinstance(spec, list):  # several cases in one process (bench --compare --quick)
        print(json.dumps([one(s) for s in spec]))
    else:
        print(json.dumps(one(spec)))


def one(spec: dict) -> dict:
    scheduler, _ = build(spec, min(spec["records"], 2 * spec["row_group_size"]))
    asyncio.run(scheduler.run())  # warm-up: lazy imports, first-call caches
    scheduler, tasks = build(spec, spec["records"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    asyncio.run(scheduler.run())
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "tasks": tasks, "peak_rss_mb": rss, "rss_before_mb": rss_before}


if __name__ == "__main__":
    main()
