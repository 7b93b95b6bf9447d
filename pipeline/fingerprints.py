"""What a run's values were computed from, recorded per file and per column, and the check that
refuses to mix in files changed since (CONTRACT section 9, "Changed files are never mixed in
silently").

At run creation the store keeps, in ``run_fingerprints``:

- ``kind = 'file'``, ``name`` = the file's absolute path, ``digest`` = sha256 of its bytes, for
  every file a column reads at run time: the module file of each ``python`` column's
  ``function: "module:callable"`` (the module named, not the modules it imports; a module with no
  ``.py`` source, such as a built-in, has none) and each ``seed_dataset`` column's ``path``.
- ``kind = 'column'``, ``name`` = the generator (config entry) name, as in
  ``tasks.column_name``; ``digest`` = sha256 of the canonical JSON of :func:`column_facts`:
  everything that decides the entry's values, the fingerprints of the columns it reads
  included, so that a change anywhere upstream changes every column downstream of it.

``resume``, ``worker`` and ``retry`` call :func:`check_changed_files` before they compute
anything: a file whose digest differs, or that is gone, or a file the run reads now that it did
not read before, refuses the command (:class:`~pipeline.errors.FilesChangedError`, exit 2) and
changes nothing. With ``accept_changes`` the command goes on: the stored digests become the
current ones and each changed file gets a row in ``run_changes``.

Hashing is cheap next to reading a seed file with pandas (which validation does anyway), and
:func:`pipeline.sources.file_digest` keeps each file's digest for as long as its
size and modification time stay the same, so a file is hashed once per process.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import FilesChangedError
from pipeline.sources import file_digest, module_source_file, resolve_seed_path
from pipeline.surface import flag

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig
    from pipeline.store.base import Store

__all__ = ["COLUMN", "FILE", "FileChange", "check_changed_files", "column_digests", "column_facts", "fingerprints",
           "read_files"]

log = logging.getLogger("pipeline.fingerprints")

FILE, COLUMN = "file", "column"
#: Bumped when :func:`column_facts` changes shape, so that old and new fingerprints never match.
FACTS_VERSION = 1


@dataclass(frozen=True)
class FileChange:
    name: str  # the file's absolute path
    old: str | None  # digest recorded with the run (None: the run did not read it)
    new: str | None  # digest now (None: the file is gone, or the run no longer reads it)
    readers: tuple[str, ...]  # generators that read it

    @property
    def what(self) -> str:
        return "gone" if self.new is None else "new" if self.old is None else "changed"


def read_files(config: PipelineConfig) -> dict[str, list[tuple[str, str]]]:
    """``{absolute path: [(generator, 'python module' | 'seed file')]}``: the files the config's
    columns read at run time."""
    files: dict[str, list[tuple[str, str]]] = {}
    for column in config.columns:
        if column.type == "python":
            path = module_source_file(column.function, config.base_dir)
            if path is not None:
                files.setdefault(str(path.resolve()), []).append((column.name, "python module"))
        elif column.type == "seed_dataset":
            path = resolve_seed_path(column.path, config.base_dir)
            files.setdefault(str(path), []).append((column.name, "seed file"))
    return files


def _digest(path: str) -> str | None:
    try:
        return file_digest(Path(path))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def column_facts(column: Any, config: PipelineConfig, files: dict[str, str | None],
                 reads: dict[str, str]) -> dict[str, Any]:
    """What decides the values of one config entry (the documented input of its fingerprint):

    - ``entry``: the entry as stored in the run's config (every key, defaults filled in);
    - ``model``: ``base_url`` and ``model`` of its alias, and its ``extra_body`` when set
      (llm_* columns; never a key, never ``extra_headers``);
    - ``module``: the digest of its python module's file (python columns; None without one);
    - ``seed_file``: the digest of its seed file (seed_dataset columns);
    - ``seed``: the config's seed where values draw from it (samplers; seed_dataset with
      ``order: shuffle``);
    - ``row_group_size`` where a task sees a whole row group or row groups in order (python
      columns with ``mode: batch`` or ``stateful``);
    - ``reads``: ``{column read: the fingerprint of the entry that produces it}``, sorted.
    """
    facts: dict[str, Any] = {"v": FACTS_VERSION, "entry": column.model_dump(mode="json", by_alias=True)}
    if column.type in ("llm_text", "llm_structured", "llm_judge"):
        model = config.models[column.model]
        facts["model"] = model.answer_facts()
    elif column.type == "python":
        path = module_source_file(column.function, config.base_dir)
        facts["module"] = files.get(str(path.resolve())) if path is not None else None
        if column.mode == "batch" or column.stateful:
            facts["row_group_size"] = config.row_group_size
    elif column.type == "seed_dataset":
        facts["seed_file"] = files.get(str(resolve_seed_path(column.path, config.base_dir)))
        if column.order == "shuffle":
            facts["seed"] = config.seed
    elif column.type == "sampler":
        facts["seed"] = config.seed
    facts["reads"] = dict(sorted(reads.items()))
    return facts


def fingerprints(config: PipelineConfig, graph: Any = None) -> dict[tuple[str, str], str]:
    """``{(kind, name): digest}`` for every file the config reads and every generator (see the
    module docstring). Files that cannot be read are left out."""
    from pipeline.graph import build_graph

    graph = graph or build_graph(config)
    files = {name: _digest(name) for name in read_files(config)}
    out: dict[tuple[str, str], str] = {(FILE, name): d for name, d in files.items() if d is not None}
    for name, (_facts, digest) in column_digests(config, graph, files).items():
        out[(COLUMN, name)] = digest
    return out


def column_digests(config: PipelineConfig, graph: Any, files: dict[str, str | None]
                   ) -> dict[str, tuple[dict[str, Any], str]]:
    """``{generator: (column_facts, fingerprint)}`` in topological order, with ``files``
    ``{absolute path: digest}`` as the files' digests (the current ones, or those a run recorded)."""
    entries = {c.name: c for c in config.columns}
    out: dict[str, tuple[dict[str, Any], str]] = {}
    for node in graph.nodes:  # topological: every producer before its readers
        reads = {col: out[graph.producer[col]][1] for col in node.depends_on if graph.producer[col] != node.name}
        facts = column_facts(entries[node.name], config, files, reads)
        text = json.dumps(facts, separators=(",", ":"), ensure_ascii=False)  # mapping order kept: it matters
        out[node.name] = (facts, hashlib.sha256(text.encode()).hexdigest())
    return out


def changed_files(stored: dict[tuple[str, str], str], current: dict[tuple[str, str], str],
                  config: PipelineConfig) -> list[FileChange]:
    """The files whose recorded digest differs from the current one, in path order."""
    readers = read_files(config)
    names = sorted({n for k, n in stored if k == FILE} | {n for k, n in current if k == FILE})
    out = []
    for name in names:
        old, new = stored.get((FILE, name)), current.get((FILE, name))
        if old != new:
            out.append(FileChange(name, old, new, tuple(g for g, _ in readers.get(name, ()))))
    return out


def check_changed_files(store: Store, run_id: str, config: PipelineConfig, accept_changes: bool = False,
                        *, graph: Any = None) -> list[FileChange]:
    """Compare the files ``run_id`` recorded with those ``config`` (the run's stored config)
    reads now. Returns the changes (empty: nothing changed).

    Raises :class:`~pipeline.errors.FilesChangedError` (exit 2), changing nothing, when a file
    changed and ``accept_changes`` is false. With ``accept_changes``, records the current
    digests and one ``run_changes`` row per changed file, in one transaction. A run created
    before fingerprints were recorded gets them recorded now (nothing to compare with)."""
    stored = store.run_fingerprints(run_id)
    current = fingerprints(config, graph)
    if not stored:
        store.replace_fingerprints(run_id, _rows(current), [])
        return []
    changes = changed_files(stored, current, config)
    if not changes:
        return []
    if not accept_changes:
        raise FilesChangedError(_message(run_id, changes, config))
    how = "accepted with --accept-changes: recorded cells kept, the rest computed with the file as it is now"
    store.replace_fingerprints(run_id, _rows(current), [
        (FILE, c.name, c.old, c.new, f"{c.what}; read by {', '.join(c.readers) or '-'}; {how}") for c in changes])
    log.warning("run %s goes on with changed files (%s; see table run_changes): %s",
                run_id, flag("--accept-changes", "accept_changes=True"), ", ".join(f"{c.name} ({c.what})" for c in changes))
    return changes


def _rows(current: dict[tuple[str, str], str]) -> list[tuple[str, str, str]]:
    return [(kind, name, digest) for (kind, name), digest in sorted(current.items())]


def _message(run_id: str, changes: list[FileChange], config: PipelineConfig) -> str:
    readers = read_files(config)
    lines = []
    for c in changes:
        roles: dict[str, list[str]] = {}
        for generator, role in readers.get(c.name, ()):
            roles.setdefault(role, []).append(f"'{generator}'")
        read_by = "; ".join(f"{role} of column{'s' if len(gs) > 1 else ''} {', '.join(gs)}"
                            for role, gs in roles.items()) or "no longer read"
        lines.append(f"{c.name} ({read_by}): {c.what}")
    return (f"run {run_id!r}: {'a file it reads has' if len(changes) == 1 else 'files it reads have'} changed "
            "since the run started:\n  " + "\n  ".join(lines) + "\n"
            "Its recorded cells were computed with the files as they were. Put them back and run the command "
            f"again, or add {flag('--accept-changes', 'accept_changes=True')}: it keeps every recorded cell, computes the remaining ones with the "
            "files as they are now, and records the change (table run_changes).")
