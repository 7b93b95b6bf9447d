"""Generators: the built-in column types, and the factory that builds them from a config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.errors import ConfigError
from pipeline.generators.base import Generator

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.llm import LlmRuntime
    from pipeline.generators.expression import ExpressionGenerator
    from pipeline.generators.python import make_python_generator
    from pipeline.generators.samplers import SamplerGenerator
    from pipeline.generators.seed_dataset import SeedDatasetGenerator

# The built-in generators (numpy, pandas) load when a run builds them: importing the base class
# for `pipeline status` must stay cheap.
_LAZY = {
    "ExpressionGenerator": "pipeline.generators.expression",
    "make_python_generator": "pipeline.generators.python",
    "SamplerGenerator": "pipeline.generators.samplers",
    "SeedDatasetGenerator": "pipeline.generators.seed_dataset",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline.generators' has no attribute {name!r}")

__all__ = [
    "ExpressionGenerator",
    "Generator",
    "SamplerGenerator",
    "SeedDatasetGenerator",
    "build_generators",
    "llm_runtime",
    "make_python_generator",
]


def llm_runtime(config: PipelineConfig) -> LlmRuntime | None:
    """A new :class:`~pipeline.llm.LlmRuntime` for the ``models`` of ``config`` when one of its
    columns is ``llm_*``, else None (and neither pipeline.llm nor aiohttp is imported). The
    caller owns it: pass it to :func:`build_generators`, and ``await runtime.aclose()`` on the
    event loop that used it. ConfigError when the LLM layer cannot be imported."""
    llm_columns = [column for column in config.columns if column.type.startswith("llm_")]
    if not llm_columns:
        return None
    try:
        from pipeline.llm import LlmRuntime
    except ImportError as exc:
        raise ConfigError(f"llm columns are not available in this installation ({exc})",
                          path=config.source, column=llm_columns[0].name) from exc
    return LlmRuntime(config.models)


def build_generators(config: PipelineConfig, *, runtime: LlmRuntime | None = None) -> dict[str, Generator]:
    """One generator per config entry, keyed by the entry's name, in config order.

    Each has ``outputs`` set to the entry's output columns. Python modules are imported and seed
    files read here, so call it once per process and share the result. ``llm_*`` columns share
    ``runtime`` (from :func:`llm_runtime`; the caller closes it): ValueError when they have none.
    """
    # Each module is imported only when its column type is used: seed files need pandas, which
    # a config without a seed column never loads (issue 12's cold start).
    generators: dict[str, Generator] = {}
    for column in config.columns:
        kind = column.type
        if kind == "sampler":
            from pipeline.generators.samplers import SamplerGenerator

            generator: Generator = SamplerGenerator(column, config)
        elif kind == "expression":
            from pipeline.generators.expression import ExpressionGenerator

            generator = ExpressionGenerator(column, render_timeout_s=config.settings.render_timeout_s)
        elif kind == "python":
            from pipeline.generators.python import make_python_generator

            generator = make_python_generator(column, config)
        elif kind == "seed_dataset":
            from pipeline.generators.seed_dataset import SeedDatasetGenerator

            generator = SeedDatasetGenerator(column, config)
        elif kind.startswith("llm_"):
            if runtime is None:
                raise ValueError(f"llm column {column.name!r} needs runtime=llm_runtime(config)")
            try:
                from pipeline.generators.llm import make_llm_generator
            except ImportError as exc:
                raise ConfigError(
                    f"llm columns are not available in this installation ({exc})",
                    path=config.source, column=column.name,
                ) from exc
            generator = make_llm_generator(column, config, runtime=runtime)
        else:  # config validation makes this unreachable
            raise ConfigError(f"unknown column type '{kind}'", path=config.source, column=column.name)
        generator.outputs = tuple(column.outputs)
        generators[column.name] = generator
    return generators
