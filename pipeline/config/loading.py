"""Reading a config: :func:`load_config` (a YAML file) and :func:`config_from_json` (a stored
config), which run the same checks and raise :class:`~pipeline.errors.ConfigError` naming the
file, the column and the fix.

Beyond what each model checks (:mod:`pipeline.config.models`), the config is checked as a whole:
every output column named once, every model alias defined with its key set in the environment,
every python column's callable imported (a Generator class's own strategy folded into its
column), every seed file read, and the column graph free of unknown names and cycles. So a
python column's module is imported here, and a seed file read: pyarrow loads for a Parquet
file, pandas and pyarrow for a CSV one (:func:`pipeline.sources.read_seed_file`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline import model_options, redact
from pipeline.config.messages import translate
from pipeline.config.models import COLUMN_TYPES, PipelineConfig, PythonColumn, SeedDatasetColumn
from pipeline.errors import ConfigError
from pipeline.graph import build_graph
from pipeline.row_reads import undeclared_message, undeclared_reads
from pipeline.sources import import_callable, is_generator_class, read_seed_file, resolve_seed_path

__all__ = ["config_from_json", "load_config"]


def load_config(path: str | os.PathLike[str]) -> PipelineConfig:
    """Read, validate and return the config at ``path``; raises ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file; check the path", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the file: {exc}", path=path) from None
    raw = _parse_yaml(text, path)
    for key in ("base_dir", "source"):
        if key in raw:
            raise ConfigError(f"unknown key '{key}'; remove it (it is set from the file's location)", path=path)
    return _build(raw, base_dir=path.resolve().parent, source=str(path))


def config_from_json(text: str, *, usable: bool = True, run_id: str | None = None) -> PipelineConfig:
    """The config :meth:`PipelineConfig.to_json` wrote, validated again from scratch.
    ``usable=False``: the stored config of a run only compared with a new one (a change), so
    what only running it needs is not checked: an ``output_schema`` an earlier
    version accepted but this one cannot use is fixed by resuming with ``--config`` (``run_id``: the
    run it belongs to, named in that advice)."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the stored config is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("the stored config is not a JSON object")
    source = raw.pop("source", None)
    base_dir = raw.pop("base_dir", None) or os.getcwd()
    return _build(raw, base_dir=Path(base_dir), source=source, stored_run=run_id or "RUN_ID", usable=usable)


class _UniqueKeyLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml: ~8x faster where built
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, path: Path) -> dict[str, Any]:
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"YAML syntax error{where}: {problem}; fix the YAML", path=path) from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(
            f"the top of the file must be a mapping (name:, num_records:, columns:, ...), not {got}", path=path
        )
    problem = _not_unicode(raw, "")
    if problem:
        raise ConfigError(problem, path=path)
    return raw


def _not_unicode(value: Any, where: str) -> str | None:
    """A YAML escape such as "\\ud83d" gives text that is not valid Unicode (a lone surrogate),
    which no file or store can hold: say where, instead of failing later with a traceback."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            return (f"{where or 'a key'} holds text that is not valid Unicode (a lone surrogate at "
                    f"character {exc.start}); write the character itself, or both halves of its escape pair")
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        here = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)
        problem = _not_unicode(key, where or "a key") or _not_unicode(item, here)
        if problem:
            return problem
    return None


def _build(raw: dict[str, Any], *, base_dir: Path, source: str | None, stored_run: str | None = None,
           usable: bool = True) -> PipelineConfig:
    where = source or "<stored config>"
    try:
        config = PipelineConfig.model_validate({**raw, "base_dir": base_dir, "source": source})
    except ValidationError as exc:
        raise translate(exc, raw, where, PipelineConfig, COLUMN_TYPES) from None
    _check_names(config, where)
    _check_models(config, where)
    redact.register_config(config)  # its keys are blanked out of every message from now on
    for column in config.columns:
        if column.type == "python":
            _check_python(column, config, where)
        elif column.type == "seed_dataset":
            _check_seed(column, config, where)
    if usable:
        _check_schemas(config, where, stored_run)
    _check_graph(config, where)
    return config


def _check_schemas(config: PipelineConfig, where: str, stored_run: str | None) -> None:
    """Every ``output_schema`` is one the answers' validator can use (built here, as the column's
    generator builds it again, so a run never meets one it cannot use)."""
    from pipeline.json_schemas import schema_validator
    from pipeline.surface import command

    for column in config.columns:
        if column.type != "llm_structured":
            continue
        try:
            schema_validator(column.output_schema)
        except ValueError as exc:
            fix = ("; this run's stored config was accepted by an earlier version: fix output_schema in the "
                   f"config file, then {command('resume', stored_run, '--config FILE', 'config=FILE')}"
                   if stored_run else "")
            raise ConfigError(f"output_schema: not a valid JSON Schema: {exc}{fix}", path=where,
                              column=column.name) from None


def _check_names(config: PipelineConfig, where: str) -> None:
    owner: dict[str, int] = {}
    for i, column in enumerate(config.columns):
        for out in column.outputs:
            if out in owner:
                if owner[out] == i:
                    problem = f"lists the output column '{out}' twice; list it once"
                else:
                    first = config.columns[owner[out]].name
                    by = "an earlier column" if first == column.name else f"column '{first}'"
                    problem = f"the column name '{out}' is already taken by {by}; give every column its own name"
                raise ConfigError(problem, path=where, column=column.name)
            owner[out] = i
    entries: set[str] = set()
    for i, column in enumerate(config.columns):
        # An entry name keys its generator, and may not stand for another entry's output.
        if column.name in entries or owner.get(column.name, i) != i:
            raise ConfigError(
                f"the name '{column.name}' is already taken by another column; give every column its own name",
                path=where, column=column.name,
            )
        entries.add(column.name)


def _check_models(config: PipelineConfig, where: str) -> None:
    for alias, users in config.used_models().items():
        if alias not in config.models:
            defined = ", ".join(sorted(config.models)) or "none"
            raise ConfigError(
                f"model '{alias}' is not defined under 'models:' (defined: {defined}); "
                "add it there or fix the alias",
                path=where, column=users[0],
            )
        env = config.models[alias].api_key_env
        if env and (missing := model_options.env_missing(env)):
            raise ConfigError(
                f"model '{alias}' takes its API key from the environment variable {env}, which "
                f"{missing}; export {env}=<your key> before running (keys never go in the file)",
                path=where, column=users[0],
            )
        for name, env in model_options.unset_header_envs(config.models[alias]):
            raise ConfigError(
                f"model '{alias}': extra_headers.{name} is read from the environment variable "
                f"{env}, which {model_options.env_missing(env)}; export {env}=<value> before running",
                path=where, column=users[0],
            )


def _check_python(column: PythonColumn, config: PipelineConfig, where: str) -> None:
    try:
        target = import_callable(column.function, config.base_dir)
    except ImportError as exc:
        raise ConfigError(str(exc), path=where, column=column.name) from None
    if not is_generator_class(target):
        _warn_undeclared_reads(target, column, config, where)
        return
    strategy = getattr(target, "strategy", None)
    if strategy not in ("cell", "batch"):
        raise ConfigError(
            f"{target.__qualname__}.strategy is {strategy!r}; set it to 'cell' or 'batch'",
            path=where, column=column.name,
        )
    if "mode" in column.model_fields_set and column.mode != strategy:
        raise ConfigError(
            f"mode is '{column.mode}' but {target.__qualname__} is a '{strategy}' Generator; "
            f"remove 'mode' or set it to '{strategy}'",
            path=where, column=column.name,
        )
    # Fold the class's own declarations into the column, so the graph, the engine and a stored
    # copy of the config all see what the generator will do.
    column.mode = strategy
    column.stateful_ = column.stateful_ or bool(getattr(target, "is_stateful", False))


def _warn_undeclared_reads(func: Any, column: PythonColumn, config: PipelineConfig, where: str) -> None:
    """A warning on stderr (logger ``pipeline.config``), not an error: the source visibly reads a
    column its requires does not list (pipeline.row_reads)."""
    for key in undeclared_reads(func, column.dependencies):
        logging.getLogger("pipeline.config").warning("warning: %s: %s", where, undeclared_message(
            column.name, key, list(column.dependencies), config.output_columns(), verb="reads"))


def _check_seed(column: SeedDatasetColumn, config: PipelineConfig, where: str) -> None:
    try:
        read_seed_file(resolve_seed_path(column.path, config.base_dir), column.columns)
    except (OSError, ValueError) as exc:
        raise ConfigError(str(exc), path=where, column=column.name) from None


def _check_graph(config: PipelineConfig, where: str) -> None:
    try:
        build_graph(config)
    except ConfigError as exc:
        if exc.path is not None:
            raise
        message = str(exc)
        prefix = f"column '{exc.column}': "
        if exc.column is not None and message.startswith(prefix):
            message = message[len(prefix):]
        raise ConfigError(message, path=where, column=exc.column) from None
