"""The patterns and bounds a config's values must keep (no imports: models and messages share them)."""

from __future__ import annotations

__all__ = [
    "DEFAULT_RENDER_TIMEOUT_S", "FUNCTION_PATTERN", "INT32_MAX", "INT64_MAX", "INT64_MIN", "MAX_DURATION_S", "MAX_ERROR_WINDOW",
    "MAX_IN_FLIGHT_TASKS", "MAX_ROW_GROUPS_IN_MEMORY", "MAX_SALVAGE_ROUNDS", "MIN_LEASE_S", "NAME_PATTERN",
    "PATTERN_HINTS", "RUN_NAME_PATTERN", "row_group_count_problem",
]

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
FUNCTION_PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$"

#: What to write instead of a value that does not match a pattern (pipeline.config.messages).
PATTERN_HINTS = {
    NAME_PATTERN: "use letters, digits and _ only, not starting with a digit",
    RUN_NAME_PATTERN: "use letters, digits, '.', '_' and '-', starting with a letter or digit",
    FUNCTION_PATTERN: "write it as 'module:callable', e.g. 'mymodule:count_words'",
}


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
#: The default of ``settings.render_timeout_s``: a template renders within it or fails its cell.
DEFAULT_RENDER_TIMEOUT_S = 10.0
MAX_ERROR_WINDOW = 1_000_000


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
