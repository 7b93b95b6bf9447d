"""The config file (CONTRACT section 3): pydantic models, validation, fingerprint.

A config is refused as a whole before anything is created. :func:`load_config` and
:func:`config_from_json` run the same checks and raise :class:`~pipeline.errors.ConfigError`
naming the file, the column and the fix; pydantic's own messages never reach the user
untranslated.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import model_options, redact, templates
from pipeline.engine.options import SchedulerOptions
from pipeline.errors import ConfigError
from pipeline.model_options import HEADER_NAME_PATTERN, MAX_PRICE, MAX_RATE_PER_MINUTE, MIN_RATE_PER_MINUTE, EnvValue
from pipeline.surface import flag
from pipeline.generators.python import import_callable, is_generator_class, module_source_file
from pipeline.generators.row_reads import undeclared_message, undeclared_reads
from pipeline.base_urls import base_url_problem
from pipeline.generators.samplers import SAMPLER_PARAMS
from pipeline.generators.seed_dataset import file_digest, read_seed_file, resolve_seed_path

__all__ = [
    "Column",
    "ExpressionColumn",
    "LlmJudgeColumn",
    "LlmStructuredColumn",
    "LlmTextColumn",
    "EnvValue",
    "ModelConfig",
    "PipelineConfig",
    "PythonColumn",
    "SamplerColumn",
    "SeedDatasetColumn",
    "Settings",
    "config_from_json",
    "load_config",
]

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
FUNCTION_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"


class _Strict(BaseModel):
    # strict: a quoted "100" or a `yes` where a number belongs is a mistake worth reporting.
    # allow_inf_nan=False: `.inf` or `.nan` is never a useful duration, rate or temperature.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# Bounds of the numbers a config holds, so that a value out of range is refused (exit 2) before
# anything is created instead of overflowing later. Where they come from:
#: runs.num_records and runs.seed are BIGINT (signed 64 bits) in the state store; the samplers
#: hash the seed as text and count records in uint64, so they take the whole range.
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
#: row_groups.row_group, row_groups.num_rows and tasks.row_index are INTEGER (32 bits on PostgreSQL).
INT32_MAX = 2**31 - 1
#: Settings: large enough for any machine, small enough that nothing derived from them
#: overflows (the backoff grows as retry_backoff_s * 2**attempt) or spins (heartbeats every lease_s / 3).
MAX_ROW_GROUPS_IN_MEMORY = 10_000
MAX_IN_FLIGHT_TASKS = 1_000_000
MAX_SALVAGE_ROUNDS = 30
MAX_DURATION_S = 7 * 24 * 3600.0  # a week
MIN_LEASE_S = 0.1
MAX_ERROR_WINDOW = 1_000_000


_ENGINE = SchedulerOptions()  # the engine's defaults are the settings' defaults: written once, there


class Settings(_Strict):
    max_concurrent_row_groups: int = Field(_ENGINE.max_concurrent_row_groups, gt=0, le=MAX_ROW_GROUPS_IN_MEMORY)
    max_in_flight_tasks: int = Field(_ENGINE.max_in_flight_tasks, gt=0, le=MAX_IN_FLIGHT_TASKS)
    salvage_max_rounds: int = Field(_ENGINE.salvage_max_rounds, ge=0, le=MAX_SALVAGE_ROUNDS)
    retry_backoff_s: float = Field(_ENGINE.retry_backoff_s, ge=0, le=3600)
    shutdown_error_rate: float = Field(_ENGINE.shutdown_error_rate, gt=0, le=1)
    shutdown_error_window: int = Field(_ENGINE.shutdown_error_window, gt=0, le=MAX_ERROR_WINDOW)
    lease_s: float = Field(_ENGINE.lease_s, ge=MIN_LEASE_S, le=MAX_DURATION_S)
    model_down_s: float = Field(_ENGINE.model_down_s, gt=0, le=MAX_DURATION_S)
    render_timeout_s: float = Field(templates.DEFAULT_RENDER_TIMEOUT_S, gt=0, le=MAX_DURATION_S)  # a template renders within this, or fails its cell
    trace: bool = _ENGINE.trace  # record every task attempt in task_traces (as --trace does)


class ModelConfig(_Strict):
    base_url: str
    model: str
    api_key_env: str | None = None
    max_parallel_requests: int = Field(16, gt=0, le=MAX_IN_FLIGHT_TASKS)
    timeout_s: float = Field(60.0, gt=0, le=MAX_DURATION_S)
    # Pacing (pipeline.llm.pacing): budgets per minute, for this process's requests to the model.
    max_requests_per_minute: float | None = Field(None, ge=MIN_RATE_PER_MINUTE, le=MAX_RATE_PER_MINUTE)
    max_tokens_per_minute: float | None = Field(None, ge=MIN_RATE_PER_MINUTE, le=MAX_RATE_PER_MINUTE)
    # Provider options: header values are secrets (never stored, logged or fingerprinted).
    extra_headers: dict[Annotated[str, Field(pattern=HEADER_NAME_PATTERN)], Union[str, EnvValue]] = Field(
        default_factory=dict)
    extra_body: dict[str, Any] = Field(default_factory=dict)
    api_key_header: str | None = Field(None, pattern=HEADER_NAME_PATTERN)
    # Cost, in the currency of the prices (per million tokens).
    price_per_million_input_tokens: float | None = Field(None, ge=0, le=MAX_PRICE)
    price_per_million_output_tokens: float | None = Field(None, ge=0, le=MAX_PRICE)

    @field_validator("base_url")
    @classmethod
    def _a_url_with_its_scheme(cls, value: str) -> str:
        if (problem := base_url_problem(value)) is not None:
            raise ValueError(problem)
        return value

    @field_validator("api_key_env", mode="before")
    @classmethod
    def _a_name_not_a_key(cls, value: Any) -> Any:
        # A key pasted here would be stored with the config and echoed by every message: refuse
        # it, showing no more of it than its first 3 characters.
        if value is not None and (not isinstance(value, str) or redact.looks_like_secret(value)):
            value = str(value)
            raise ValueError(
                f"api_key_env must be the NAME of an environment variable (like OPENAI_API_KEY), not "
                f"the key itself (this value starts with {value[:3]!r}); export NAME=<your key> and put "
                "NAME here: keys never go in the file"
            )
        return value

    _headers_ok = field_validator("extra_headers")(model_options.check_extra_headers)
    _body_ok = field_validator("extra_body")(model_options.check_extra_body)

    @model_validator(mode="after")
    def _key_header_needs_a_key(self) -> "ModelConfig":
        if self.api_key_header is not None and self.api_key_env is None:
            raise ValueError("api_key_header names the header the key goes in; set api_key_env too")
        return self

    def answer_facts(self) -> dict[str, Any]:
        """See :func:`pipeline.model_options.answer_facts` (fingerprints)."""
        return model_options.answer_facts(self)

    @property
    def prices(self) -> tuple[float, float] | None:
        """``(input, output)`` price per million tokens, or None when neither is set."""
        if self.price_per_million_input_tokens is None and self.price_per_million_output_tokens is None:
            return None
        return (self.price_per_million_input_tokens or 0.0, self.price_per_million_output_tokens or 0.0)


# Columns.


def _check_template(text: str | None) -> str | None:
    if text is not None and (problem := templates.syntax_problem(text)):
        raise ValueError(problem)
    return text


class _ColumnBase(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    requires: list[str] = Field(default_factory=list)

    def _templates(self) -> tuple[str, ...]:
        return ()

    @property
    def outputs(self) -> tuple[str, ...]:
        """The output columns this entry fills, in column order."""
        return (self.name,)

    @property
    def dependencies(self) -> tuple[str, ...]:
        """The columns this entry reads: template variables plus ``requires``, sorted, unique.
        May contain the entry's own name."""
        names = set(self.requires)
        for text in self._templates():
            names |= templates.referenced_names(text)
        return tuple(sorted(names))

    @property
    def strategy(self) -> Literal["cell", "batch"]:
        return "cell"

    @property
    def stateful(self) -> bool:
        return False


class SamplerColumn(_ColumnBase):
    type: Literal["sampler"]
    sampler: Literal["category", "integer", "uniform", "gaussian", "bernoulli", "uuid", "datetime"]
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_params(self):
        model = SAMPLER_PARAMS[self.sampler]
        try:
            parsed = model.model_validate(self.params)
        except ValidationError as exc:
            problems = [_describe(err, model, tuple(err["loc"]), ("params",)) for err in exc.errors()]
            raise ValueError(f"{self.sampler} sampler: " + "; ".join(problems)) from None
        self.params = parsed.model_dump(mode="json", exclude_none=True)
        return self

    @property
    def strategy(self) -> Literal["batch"]:
        return "batch"


class ExpressionColumn(_ColumnBase):
    type: Literal["expression"]
    expr: str
    dtype: Literal["str", "int", "float", "bool", "json"] = "str"

    @field_validator("expr")
    @classmethod
    def _expr_parses(cls, text: str) -> str:
        return _check_template(text)

    def _templates(self) -> tuple[str, ...]:
        return (self.expr,)


class PythonColumn(_ColumnBase):
    type: Literal["python"]
    function: str = Field(pattern=FUNCTION_PATTERN)
    mode: Literal["cell", "batch"] = "cell"
    # `outputs` in the file; the attribute name is taken by the property every column has.
    output_names: list[Annotated[str, Field(pattern=NAME_PATTERN)]] | None = Field(
        None, alias="outputs", min_length=1
    )
    stateful_: bool = Field(False, alias="stateful")

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.output_names) if self.output_names else (self.name,)

    @property
    def strategy(self) -> Literal["cell", "batch"]:
        return self.mode

    @property
    def stateful(self) -> bool:
        return self.stateful_


class SeedDatasetColumn(_ColumnBase):
    type: Literal["seed_dataset"]
    path: str = Field(min_length=1)
    columns: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1)
    order: Literal["sequential", "shuffle"] = "sequential"

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(self.columns)

    @property
    def strategy(self) -> Literal["batch"]:
        return "batch"


class _LlmColumn(_ColumnBase):
    prompt: str
    system_prompt: str | None = None
    model: str
    temperature: float | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, gt=0, le=INT32_MAX)

    @field_validator("prompt", "system_prompt")
    @classmethod
    def _prompts_parse(cls, text: str | None) -> str | None:
        return _check_template(text)

    def _templates(self) -> tuple[str, ...]:
        return (self.prompt,) if self.system_prompt is None else (self.prompt, self.system_prompt)


class LlmTextColumn(_LlmColumn):
    type: Literal["llm_text"]


class LlmStructuredColumn(_LlmColumn):
    type: Literal["llm_structured"]
    output_schema: dict[str, Any]

    @field_validator("output_schema")
    @classmethod
    def _is_json_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        import jsonschema

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        return schema


class LlmJudgeColumn(_LlmColumn):
    type: Literal["llm_judge"]
    rubric: dict[str, str] = Field(min_length=1)


Column = Annotated[
    Union[
        SamplerColumn,
        ExpressionColumn,
        PythonColumn,
        SeedDatasetColumn,
        LlmTextColumn,
        LlmStructuredColumn,
        LlmJudgeColumn,
    ],
    Field(discriminator="type"),
]

#: The `type:` of each column model.
COLUMN_TYPES: dict[str, type[_ColumnBase]] = {
    cls.model_fields["type"].annotation.__args__[0]: cls
    for cls in (SamplerColumn, ExpressionColumn, PythonColumn, SeedDatasetColumn,
                LlmTextColumn, LlmStructuredColumn, LlmJudgeColumn)
}
LLM_TYPES = frozenset({"llm_text", "llm_structured", "llm_judge"})


class PipelineConfig(_Strict):
    """A validated config. Build it with :func:`load_config` or :func:`config_from_json`."""

    name: str = Field(pattern=RUN_NAME_PATTERN)
    num_records: int = Field(gt=0, le=INT64_MAX)
    row_group_size: int = Field(1000, gt=0, le=INT32_MAX)
    seed: int = Field(0, ge=INT64_MIN, le=INT64_MAX)
    settings: Settings = Field(default_factory=Settings)
    models: dict[str, ModelConfig] = Field(default_factory=dict)
    columns: list[Column] = Field(min_length=1)
    #: Not from the file: its folder, against which python modules and seed paths resolve.
    base_dir: Path = Field(default_factory=Path.cwd, strict=False)
    #: Not from the file: its path, for messages.
    source: str | None = None

    @model_validator(mode="after")
    def _row_groups_fit(self):
        if (problem := row_group_count_problem(self.num_records, self.row_group_size)) is not None:
            raise ValueError(problem)
        return self

    def output_columns(self) -> list[str]:
        """Every output column, in config order (multi-output entries expanded in place)."""
        return [out for column in self.columns for out in column.outputs]

    def used_models(self) -> dict[str, list[str]]:
        """Model alias -> the columns that use it, in config order."""
        used: dict[str, list[str]] = {}
        for column in self.columns:
            if column.type in LLM_TYPES:
                used.setdefault(column.model, []).append(column.name)
        return used

    def fingerprint(self) -> str:
        """sha256 of everything that decides the values: seed, row group size, columns, the
        models' endpoints and names, the seed files' and python modules' contents. Not
        num_records, not settings, never a secret."""
        files: dict[str, str | None] = {}
        for column in self.columns:
            if column.type == "seed_dataset":
                path = resolve_seed_path(column.path, self.base_dir)
                files[column.name] = file_digest(path) if path.is_file() else None
            elif column.type == "python":
                source = module_source_file(column.function, self.base_dir)
                files[column.name] = file_digest(source) if source else None
        facts = {
            "seed": self.seed,
            "row_group_size": self.row_group_size,
            "columns": [c.model_dump(mode="json", by_alias=True) for c in self.columns],
            # Only the models in use: an unused alias does not change a value.
            "models": {
                alias: self.models[alias].answer_facts()
                for alias in sorted(self.used_models())
                if alias in self.models
            },
            "files": files,
        }
        # Mapping order is kept, not sorted: a rubric's or a schema's order changes prompts.
        canonical = json.dumps(facts, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_json(self) -> str:
        """Everything needed to rebuild this config without its file (see config_from_json)."""
        data = self.model_dump(mode="json", by_alias=True)
        data["base_dir"] = str(Path(self.base_dir).resolve())
        return json.dumps(data, ensure_ascii=False)  # key order is part of the config (prompts)

    def with_num_records(self, n: int) -> PipelineConfig:
        """A copy producing ``n`` records (``--num-records``); ConfigError naming the range."""
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= INT64_MAX:
            raise ConfigError(f"{flag('--num-records', 'num_records')} must be a whole number from 1 to "
                              f"{INT64_MAX:,}, not {n!r}", path=self.source)
        if (problem := row_group_count_problem(n, self.row_group_size)) is not None:
            raise ConfigError(f"{flag('--num-records', 'num_records=')} {n}: {problem}", path=self.source)
        return self.model_copy(update={"num_records": n}, deep=True)


def row_group_count_problem(num_records: int, row_group_size: int) -> str | None:
    """Why ``num_records`` in row groups of ``row_group_size`` does not fit the state store (row
    group numbers are 32-bit), or None."""
    groups = -(-num_records // row_group_size)
    if groups <= INT32_MAX:
        return None
    needed = -(-num_records // INT32_MAX)
    fix = (f"raise row_group_size to at least {needed:,} or lower num_records" if needed <= INT32_MAX
           else f"lower num_records to at most {INT32_MAX * INT32_MAX:,} (row groups of at most {INT32_MAX:,})")
    return (f"num_records ({num_records:,}) / row_group_size ({row_group_size:,}) makes {groups:,} row groups; "
            f"at most {INT32_MAX:,} are allowed: {fix}")


# Loading and validation.


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


def config_from_json(text: str) -> PipelineConfig:
    """The config :meth:`PipelineConfig.to_json` wrote, validated again from scratch."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the stored config is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError("the stored config is not a JSON object")
    source = raw.pop("source", None)
    base_dir = raw.pop("base_dir", None) or os.getcwd()
    return _build(raw, base_dir=Path(base_dir), source=source)


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


def _build(raw: dict[str, Any], *, base_dir: Path, source: str | None) -> PipelineConfig:
    where = source or "<stored config>"
    try:
        config = PipelineConfig.model_validate({**raw, "base_dir": base_dir, "source": source})
    except ValidationError as exc:
        raise _translate(exc, raw, where) from None
    _check_names(config, where)
    _check_models(config, where)
    redact.register_config(config)  # its keys are blanked out of every message from now on
    for column in config.columns:
        if column.type == "python":
            _check_python(column, config, where)
        elif column.type == "seed_dataset":
            _check_seed(column, config, where)
    _check_graph(config, where)
    return config


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
        if env and not os.environ.get(env):
            raise ConfigError(
                f"model '{alias}' takes its API key from the environment variable {env}, which is not "
                f"set; export {env}=<your key> before running (keys never go in the file)",
                path=where, column=users[0],
            )
        for name, env in model_options.unset_header_envs(config.models[alias]):
            raise ConfigError(
                f"model '{alias}': extra_headers.{name} is read from the environment variable "
                f"{env}, which is not set; export {env}=<value> before running",
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
    column its requires does not list (pipeline.generators.row_reads)."""
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
        from pipeline.graph import build_graph
    except ModuleNotFoundError as exc:
        if exc.name != "pipeline.graph":
            raise
        return  # the graph module is not there yet: unknown dependencies and cycles go unchecked
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


# pydantic's errors, translated.


def _unwrap(tp: Any) -> Any:
    while True:
        if hasattr(tp, "__metadata__"):  # Annotated[...]
            tp = tp.__origin__
            continue
        args = [a for a in getattr(tp, "__args__", ()) if a is not type(None)]
        if getattr(tp, "__origin__", None) is Union or type(tp).__name__ == "UnionType":
            if len(args) == 1:
                tp = args[0]
                continue
        return tp


def _type_at(root: Any, loc: tuple[Any, ...]) -> Any:
    tp = root
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            tp = next(
                (f.annotation for n, f in tp.model_fields.items() if part in (n, f.alias)), None
            )
        elif getattr(tp, "__origin__", None) in (list, tuple) and isinstance(part, int):
            tp = tp.__args__[0]
        elif getattr(tp, "__origin__", None) is dict:
            tp = tp.__args__[1]
        else:
            return None
    return _unwrap(tp)


def _allowed_keys(root: Any, loc: tuple[Any, ...]) -> list[str]:
    tp = _type_at(root, loc)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [f.alias or n for n, f in tp.model_fields.items() if n not in ("base_dir", "source")]
    return []


_PATTERN_HINTS = {
    NAME_PATTERN: "use letters, digits and _ only, not starting with a digit",
    RUN_NAME_PATTERN: "use letters, digits, '.', '_' and '-', starting with a letter or digit",
    FUNCTION_PATTERN: "write it as 'module:callable', e.g. 'mymodule:count_words'",
}


def _describe(err: dict[str, Any], root: Any, loc: tuple[Any, ...], prefix: tuple[Any, ...] = ()) -> str:
    """One pydantic error as a sentence with the fix. ``loc`` is relative to ``root``; ``prefix``
    only shows in the message."""
    kind, msg = err["type"], err["msg"]
    field = ".".join(str(p) for p in prefix + loc)
    if kind == "missing":
        return f"missing required key '{field}'; add it"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(root, loc[:-1])
        hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return f"unknown key '{field}'{hint}; remove it or fix its spelling"
    if kind == "union_tag_invalid":
        return f"unknown column type '{err['ctx']['tag']}'; use one of: {', '.join(COLUMN_TYPES)}"
    if kind == "union_tag_not_found":
        return f"missing required key 'type'; set it to one of: {', '.join(COLUMN_TYPES)}"
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
    elif kind == "string_pattern_mismatch":
        msg = _PATTERN_HINTS.get(err.get("ctx", {}).get("pattern"), msg)
    got = err.get("input")
    if kind != "value_error" and not isinstance(got, (dict, list)) and loc:
        msg = f"{msg} (got {got!r})"
    return f"{field}: {msg}" if field else msg


def _translate(exc: ValidationError, raw: dict[str, Any], where: str) -> ConfigError:
    problems: list[tuple[str | None, str]] = []
    entries = raw.get("columns") if isinstance(raw.get("columns"), list) else []
    for err in exc.errors():
        loc = tuple(err["loc"])
        if len(loc) >= 2 and loc[0] == "columns" and isinstance(loc[1], int) and loc[1] < len(entries):
            entry = entries[loc[1]]
            entry = entry if isinstance(entry, dict) else {}
            name = entry.get("name")
            label = name if isinstance(name, str) and name else f"#{loc[1] + 1}"
            cls = COLUMN_TYPES.get(entry.get("type")) if isinstance(entry.get("type"), str) else None
            rest = loc[2:]
            if cls is not None and rest[:1] == (entry["type"],):
                rest = rest[1:]
            if err["type"] == "model_attributes_type":
                problems.append((label, "a column must be a mapping with name:, type: and its keys"))
            else:
                problems.append((label, _describe(err, cls, rest)))
        else:
            problems.append((None, _describe(err, PipelineConfig, loc)))
    if len(problems) == 1:
        column, text = problems[0]
        return ConfigError(text, path=where, column=column)
    columns = {c for c, _ in problems}
    lines = [f"column '{c}': {t}" if c is not None else t for c, t in problems]
    only = columns.pop() if len(columns) == 1 else None
    if only is not None:
        lines = [t for _, t in problems]
    return ConfigError(
        f"{len(problems)} problems:\n  " + "\n  ".join(lines), path=where, column=only
    )
