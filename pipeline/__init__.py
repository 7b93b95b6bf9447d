"""pipeline: a persistent, resumable, dependency-aware async engine that generates datasets
column by column and record by record. Every task state and every finished value is recorded
in a SQL state store, so a killed run resumes exactly where it stopped."""

from typing import TYPE_CHECKING

from pipeline.aio import aresume, aretry, arun
from pipeline.api import (db_current, db_upgrade, delete_run, export, list_runs, load_dataset, plan_change, preview,
                          query, report, resume, retry, run, status, validate)
from pipeline.errors import PipelineError, RetryableError

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig, load_config
    from pipeline.generators.base import Generator


def __getattr__(name: str):
    # The config models (pydantic) and the generators' base (asyncio) load on first use, not
    # with every `pipeline` command.
    if name in ("PipelineConfig", "load_config"):
        from pipeline import config

        return getattr(config, name)
    if name == "Generator":
        from pipeline.generators.base import Generator

        return Generator
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")

__all__ = [
    "Generator",
    "PipelineConfig",
    "PipelineError",
    "RetryableError",
    "aresume",
    "aretry",
    "arun",
    "db_current",
    "db_upgrade",
    "delete_run",
    "export",
    "list_runs",
    "load_config",
    "load_dataset",
    "plan_change",
    "preview",
    "query",
    "report",
    "resume",
    "retry",
    "run",
    "status",
    "validate",
]
