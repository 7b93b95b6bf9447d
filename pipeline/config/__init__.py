"""The config file (CONTRACT section 3): pydantic models, validation, fingerprint.

A config is refused as a whole before anything is created. :func:`load_config` and
:func:`config_from_json` run the same checks and raise :class:`~pipeline.errors.ConfigError`
naming the file, the column and the fix; pydantic's own messages never reach the user
untranslated.

Importing it loads neither numpy nor pandas (tests/test_imports.py holds that); loading a config
with a seed file reads the file, which loads pyarrow (Parquet) or pandas and pyarrow (CSV).

- :mod:`~pipeline.config.models`: the models (:class:`PipelineConfig` and what it holds);
- :mod:`~pipeline.config.loading`: YAML and stored JSON in, the checks that span the config;
- :mod:`~pipeline.config.messages`: pydantic's errors as sentences with the fix;
- :mod:`~pipeline.config.limits`: the patterns and bounds of the values;
- :mod:`~pipeline.config.sampler_params`: the ``params`` of each sampler kind.
"""

# Every public name pipeline/config.py had before it became this package, so that `pipeline.config.X`
# keeps working; __all__ is the public API, as it was.
from pipeline.config.limits import (FUNCTION_PATTERN, INT32_MAX, INT64_MAX, INT64_MIN, MAX_DURATION_S,
                                    MAX_ERROR_WINDOW, MAX_IN_FLIGHT_TASKS, MAX_ROW_GROUPS_IN_MEMORY,
                                    MAX_SALVAGE_ROUNDS, MIN_LEASE_S, NAME_PATTERN, RUN_NAME_PATTERN,
                                    row_group_count_problem)
from pipeline.config.loading import config_from_json, load_config
from pipeline.config.models import (COLUMN_TYPES, LLM_TYPES, Column, EnvValue, ExpressionColumn, LlmJudgeColumn,
                                    LlmStructuredColumn, LlmTextColumn, ModelConfig, PipelineConfig, PythonColumn,
                                    SamplerColumn, SeedDatasetColumn, Settings)

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
