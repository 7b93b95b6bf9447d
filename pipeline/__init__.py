"""pipeline: a persistent, resumable, dependency-aware async engine that generates datasets
column by column and record by record. Every task state and every finished value is recorded
in a SQL state store, so a killed run resumes exactly where it stopped."""

from typing import TYPE_CHECKING

from pipeline.aio import aresume, aretry, arun
from pipeline.api import export, list_runs, load_dataset, preview, report, resume, retry, run, status, validate
from pipeline.errors import PipelineError, RetryableError
from pipeline.generators.base import Generator

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig, load_config


def __getattr__(name: str):
    # The config models (pydantic) load on first use, not with every `pipeline` command.
    if name in ("PipelineConfig", "load_config"):
        from pipeline import config

        return getattr(config, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")

__all__ = [
    "Generator",
    "PipelineConfig",
    "PipelineError",
    "RetryableError",
    "aresume",
    "aretry",
    "arun",
    "export",
    "list_runs",
    "load_config",
    "load_dataset",
    "preview",
    "report",
    "resume",
    "retry",
    "run",
    "status",
    "validate",
]
