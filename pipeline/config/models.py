"""The config's pydantic models: :class:`PipelineConfig` and what it holds (:class:`Settings`,
:class:`ModelConfig`, one class per column type). Each model checks its own values; the checks
that span the config (names, models, modules, seed files, the graph) are in
:mod:`pipeline.config.loading`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import model_options, redact
from pipeline.base_urls import base_url_problem
from pipeline.config.limits import (DEFAULT_RENDER_TIMEOUT_S, FUNCTION_PATTERN, INT32_MAX, INT64_MAX, INT64_MIN,
                                    MAX_DURATION_S, MAX_ERROR_WINDOW, MAX_IN_FLIGHT_TASKS, MAX_ROW_GROUPS_IN_MEMORY,
                                    MAX_SALVAGE_ROUNDS, MIN_LEASE_S, NAME_PATTERN, RUN_NAME_PATTERN,
                                    row_group_count_problem)
from pipeline.config.messages import describe
from pipeline.config.sampler_params import SAMPLER_PARAMS
from pipeline.engine.options import SchedulerOptions
from pipeline.errors import ConfigError
from pipeline.model_options import HEADER_NAME_PATTERN, MAX_PRICE, MAX_RATE_PER_MINUTE, MIN_RATE_PER_MINUTE, EnvValue
from pipeline.sources import file_digest, module_source_file, resolve_seed_path
from pipeline.surface import flag

__all__ = [
    "COLUMN_TYPES",
    "LLM_TYPES",
    "Column",
    "EnvValue",
    "ExpressionColumn",
    "LlmJudgeColumn",
    "LlmStructuredColumn",
    "LlmTextColumn",
    "ModelConfig",
    "PipelineConfig",
    "PythonColumn",
    "SamplerColumn",
    "SeedDatasetColumn",
    "Settings",
]


class _Strict(BaseModel):
    # strict: a quoted "100" or a `yes` where a number belongs is a mistake worth reporting.
    # allow_inf_nan=False: `.inf` or `.nan` is never a useful duration, rate or temperature.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


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
    render_timeout_s: float = Field(DEFAULT_RENDER_TIMEOUT_S, gt=0, le=MAX_DURATION_S)  # a template renders within this, or fails its cell
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
    # jinja2 (~25 ms) loads with the first template: a config without one never needs it.
    from pipeline import templates

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
            from pipeline import templates

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
            problems = [describe(err, model, tuple(err["loc"]), ("params",)) for err in exc.errors()]
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
        # Whether the answers' validator can use it is checked once the config is built
        # (pipeline.config.loading: not for the stored config of a run only read or compared).
        from pipeline.json_schemas import schema_json_form

        try:
            return schema_json_form(schema)
        except ValueError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc}") from None


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
