"""Files made from a run: the dataset (export, with or without a dataset card) and the picture
of its traces (report)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.api.reads import status_of
from pipeline.api.state import open_state, require_run_store, validate_run_id
from pipeline.errors import ExportError, PipelineError
from pipeline.surface import flag

__all__ = ["STDOUT", "export", "report"]

#: The output name that means standard output.
STDOUT = "-"


def export(run_id: str, output: str | os.PathLike, *, format: str | None = None, card: bool = False,
           home: str | os.PathLike | None = None, db: str | None = None) -> dict[str, Any]:
    """Write the dataset to ``output`` (parquet, csv or jsonl; from the suffix by default).
    ``"-"`` is standard output (parquet there only when it is not a terminal). Returns ``{"records", "complete", "path", "format"}``; an incomplete run exports its
    checkpointed records. With ``card``, ``output`` is a folder: the data goes to
    ``data/train.<format>`` in it (parquet by default) and a Hugging Face dataset card to
    ``README.md`` (:mod:`pipeline.card`); ``"card"`` in the result is its path."""
    validate_run_id(run_id)
    from pipeline.dataset import FORMATS, read_dataset

    to_stdout = str(output) == STDOUT
    if card:
        if to_stdout:
            raise PipelineError("--card writes a folder (data/ and README.md), and '-' is standard output: "
                                "name a folder")
        return _export_card(run_id, Path(output), (format or "parquet").lower(), home, db)
    fmt = (format or Path(output).suffix.lstrip(".") or "parquet").lower()
    if fmt not in FORMATS:
        raise PipelineError(f"unknown export format {fmt!r}: use {flag('--format', 'format=')} parquet, csv or jsonl, "
                            "or an output name ending in .parquet, .csv or .jsonl")
    require_run_store(home, db, run_id)
    home_path, store = open_state(home, db, read_only=True)
    try:
        dataset = read_dataset(store, run_id, home_path)
    finally:
        store.close()
    if to_stdout:
        _write_stdout(dataset, fmt)
        return {"records": dataset.num_rows, "complete": dataset.complete, "path": STDOUT, "format": fmt}
    out = Path(output)
    _make_folder(out.parent)
    dataset.write(out, fmt)
    return {"records": dataset.num_rows, "complete": dataset.complete, "path": str(out), "format": fmt}


def _write_stdout(dataset: Any, fmt: str) -> None:
    """The dataset on standard output, as it comes (a pipe is fine); ExportError when it cannot be."""
    stream = getattr(sys.stdout, "buffer", None)
    if stream is None:  # a notebook's output widget takes text, not a file's bytes
        raise ExportError("standard output here takes no file (a notebook?); name a file to write")
    if fmt == "parquet" and sys.stdout.isatty():
        raise ExportError("Parquet is binary and standard output is a terminal: pipe or redirect it "
                          f"(`> out.parquet`), or pass {flag('--format', 'format=')} jsonl or csv")
    sys.stdout.flush()
    try:
        dataset.write_to(stream, fmt)
        stream.flush()
    except OSError as exc:
        if isinstance(exc, BrokenPipeError):
            # The reader went away (`| head`): nothing more can reach it, and the interpreter's
            # own flush at exit would fail again; what stdout still holds goes to /dev/null.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            raise ExportError("standard output was closed by its reader before the whole dataset was "
                              "written (the records sent were cut off)") from exc
        raise ExportError(f"could not write standard output: {exc}") from exc


def _make_folder(folder: Path) -> None:
    """The output's folder, made if needed; ExportError (exit 2) when it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"could not make the folder {folder}: {exc}; nothing was written") from exc


def _export_card(run_id: str, folder: Path, fmt: str, home: Any, db: Any) -> dict[str, Any]:
    from pipeline import card
    from pipeline.config import PipelineConfig
    from pipeline.dataset import FORMATS, read_dataset
    from pipeline.graph import build_graph

    if fmt not in FORMATS:
        raise PipelineError(f"unknown export format {fmt!r}: use --format parquet, csv or jsonl")
    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"--card writes a folder, and {folder} is a file: name a folder (new or existing)")
    require_run_store(home, db, run_id)
    home_path, store = open_state(home, db, read_only=True)
    try:
        dataset = read_dataset(store, run_id, home_path)
        info = store.get_run(run_id)
        state = status_of(store, run_id)
    finally:
        store.close()
    # The stored config as it is (its modules were folded in when the run started): no module
    # is imported and no seed file read to describe it.
    raw = json.loads(info.config)
    cfg = PipelineConfig.model_validate({**raw, "base_dir": raw.get("base_dir") or os.getcwd()})
    graph = build_graph(cfg)
    generator_of = {out: column for column in cfg.columns for out in column.outputs}
    data_rel = card.DATA_FILE.format(fmt=fmt)
    data_path = folder / data_rel
    _make_folder(data_path.parent)
    dataset.write(data_path, fmt)
    columns = [{"name": name, "type": generator_of[name].type, "generator": generator_of[name].name}
               for name in dataset.columns]
    text = card.card_text(status=state, config_json=info.config, schema=dataset.to_arrow().schema,
                          records=dataset.num_rows, data_path=data_rel, data_bytes=data_path.stat().st_size,
                          mermaid=graph.to_mermaid(), columns=columns)
    readme = folder / "README.md"
    tmp = folder / f".README.md.{os.getpid()}.tmp"
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, readme)
    except OSError as exc:
        raise ExportError(f"could not write {readme}: {exc}") from exc
    return {"records": dataset.num_rows, "complete": dataset.complete, "path": str(data_path), "format": fmt,
            "card": str(readme)}


def report(run_id: str, output: str | os.PathLike, *, format: str | None = None,
           home: str | os.PathLike | None = None, db: str | None = None) -> dict[str, Any]:
    """Draw the traced run's report (:mod:`pipeline.reporting`) to ``output``: PNG, SVG, HTML, or
    with ``format="json"`` the series it is drawn from. Returns ``{"path", "format",
    "attempts", "invocations"}``. PipelineError when the run was not traced or the format is
    unknown; works on a run still going."""
    validate_run_id(run_id)
    from pipeline import reporting

    fmt = (format or Path(output).suffix.lstrip(".")).lower()
    if fmt not in reporting.FORMATS:
        raise PipelineError(f"unknown report format {fmt!r}: name the output FILE.png, FILE.svg or FILE.html, "
                            f"or pass --format {'|'.join(reporting.FORMATS)}")
    require_run_store(home, db, run_id)
    _, store = open_state(home, db, read_only=True)
    try:
        data = reporting.series(store, run_id)
    finally:
        store.close()
    path = reporting.draw(data, output, fmt)
    return {"path": str(path), "format": fmt, "attempts": sum(len(v) for v in data["lanes"].values()),
            "invocations": len(data["invocations"])}


