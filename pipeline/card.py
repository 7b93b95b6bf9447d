"""The dataset card of `pipeline export RUN_ID --output DIR --card`: ``DIR/README.md`` in the
Hugging Face dataset-card form, beside the data in ``DIR/data/train.<format>``.

The card's YAML header names the data file (``configs``) and describes it (``dataset_info``:
features with their types, the number of records, the data file's size; ``size_categories``), so
the folder can be pushed to the Hub as it is. Its body gives the run (id, status, dates), the
counts (records written, dropped), the columns, the column DAG as a mermaid graph, the config
that made it (as stored with the run: model names and ``api_key_env`` names, never a key),
the drops grouped by column and error with one example each, and model usage (and cost, where
prices are configured).
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pyarrow as pa
import yaml

from pipeline.costs import money

__all__ = ["DATA_FILE", "card_text", "features", "size_category"]

#: Where the data goes inside the card's folder (``{fmt}``: parquet, csv or jsonl).
DATA_FILE = "data/train.{fmt}"

_SIMPLE = [
    (pa.types.is_boolean, "bool"), (pa.types.is_int8, "int8"), (pa.types.is_int16, "int16"),
    (pa.types.is_int32, "int32"), (pa.types.is_int64, "int64"), (pa.types.is_uint8, "uint8"),
    (pa.types.is_uint16, "uint16"), (pa.types.is_uint32, "uint32"), (pa.types.is_uint64, "uint64"),
    (pa.types.is_float16, "float16"), (pa.types.is_float32, "float32"), (pa.types.is_float64, "float64"),
    (pa.types.is_string, "string"), (pa.types.is_large_string, "large_string"), (pa.types.is_binary, "binary"),
    (pa.types.is_large_binary, "large_binary"), (pa.types.is_date32, "date32"), (pa.types.is_null, "null"),
]


def _feature(name: str | None, kind: pa.DataType) -> dict[str, Any]:
    """One feature in the Hub's dataset_info form (nested for structs and lists)."""
    out: dict[str, Any] = {} if name is None else {"name": name}
    if pa.types.is_struct(kind):
        out["struct"] = [_feature(kind.field(i).name, kind.field(i).type) for i in range(kind.num_fields)]
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        inner = _feature(None, kind.value_type)
        out["list"] = inner.get("dtype", inner)
    elif pa.types.is_timestamp(kind):
        out["dtype"] = f"timestamp[{kind.unit}{', tz=' + kind.tz if kind.tz else ''}]"
    elif pa.types.is_decimal(kind):
        out["dtype"] = f"decimal128({kind.precision}, {kind.scale})"
    else:
        out["dtype"] = next((dtype for test, dtype in _SIMPLE if test(kind)), "string")
    return out


def features(schema: pa.Schema) -> list[dict[str, Any]]:
    """The dataset's features as the Hub writes them in ``dataset_info.features``."""
    return [_feature(field.name, field.type) for field in schema]


def size_category(n: int) -> str:
    """The Hub's ``size_categories`` bucket of ``n`` records (``n<1K``, ``1K<n<10K``, ...)."""
    for limit, label in [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"),
                         (1_000_000_000, "100M<n<1B")]:
        if n < limit:
            return label
    return "n>1T" if n >= 10**12 else "1B<n<10B" if n < 10**10 else "10B<n<100B" if n < 10**11 else "100B<n<1T"


def _when(seconds: float | None) -> str:
    return "-" if not seconds else dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _cell(text: Any, chars: int = 160) -> str:
    text = " ".join(str(text).split())
    text = text if len(text) <= chars else text[: chars - 3] + "..."
    return text.replace("|", "\\|")


def card_text(*, status: dict[str, Any], config_json: str, schema: pa.Schema, records: int, data_path: str,
              data_bytes: int, mermaid: str, columns: list[dict[str, str]]) -> str:
    """README.md of the card: ``status`` is :func:`pipeline.api.status`'s dict, ``config_json``
    the run's stored config, ``schema`` and ``records`` those of the exported data at
    ``data_path`` (relative to the card, ``data_bytes`` long), ``columns`` ``[{"name", "type",
    "generator"}]`` in export order."""
    config = json.loads(config_json)
    config.pop("base_dir", None)
    config.pop("source", None)
    header = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": data_path}]}],
        "dataset_info": {
            "features": features(schema),
            "splits": [{"name": "train", "num_bytes": data_bytes, "num_examples": records}],
            "download_size": data_bytes,
            "dataset_size": data_bytes,
        },
        "size_categories": [size_category(records)],
        "tags": ["synthetic"],
    }
    name = config.get("name") or status["run_id"]
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
        f"# {name}", "",
        f"Synthetic data generated by `pipeline` run `{status['run_id']}` ({status['status']}), "
        f"created {_when(status.get('created_at'))}, finished {_when(status.get('finished_at'))}.", "",
        "## Records", "",
        f"- written: {records:,} (in `{data_path}`)",
        f"- dropped: {status['records_dropped']:,} (failed for good; see below)",
        f"- asked for: {status['num_records']:,}", "",
        "## Columns", "",
        "| column | type | generator |", "|---|---|---|",
        *(f"| {c['name']} | {c['type']} | {c['generator']} |" for c in columns), "",
        "## How it was made", "",
        "Each column is computed from the columns it reads (the graph), record by record:", "",
        "```mermaid", mermaid.rstrip(), "```", "",
        "The config, as stored with the run:", "",
        "```yaml", yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip(), "```", "",
    ]
    failures = status.get("failures") or []
    lines += ["## Drops by error", ""]
    if failures:
        lines += ["| column | error | count | example |", "|---|---|---|---|"]
        lines += [f"| {f['column']} | {f['error']} | {f['count']:,} | {_cell(f['example'])} |" for f in failures]
    else:
        lines.append("No task failed for good.")
    lines.append("")
    models = status.get("models") or {}
    if models:
        lines += ["## Model usage", "", "| model | requests | prompt tokens | completion tokens | 429s | cost |",
                  "|---|---|---|---|---|---|"]
        for alias, m in models.items():
            cost = m.get("cost")
            lines.append(f"| {alias} | {m.get('requests', 0):,} | {m.get('prompt_tokens', 0):,} | "
                         f"{m.get('completion_tokens', 0):,} | {m.get('rate_limited', 0):,} | "
                         f"{money(cost)} |")
        lines.append("")
    return "\n".join(lines)
