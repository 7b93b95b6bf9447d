"""The state store: where it is (``home``, ``db``), opening it, its schema (Alembic), and the
read-only SQL of `pipeline sql`. Nothing here imports the engine, pandas or (unless the schema
must change) Alembic: `pipeline status`, `runs` and `sql` stay quick."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import HomeError, InvalidRunIdError, RunNotFoundError, StoreError
from pipeline.surface import flag

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

    from pipeline.store.base import Store

__all__ = ["RUN_ID", "db_current", "db_upgrade", "make_home_folder", "missing_store", "open_state", "prepare", "query",
           "require_run_store", "require_store", "resolve_paths", "validate_run_id"]

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def resolve_paths(home: str | os.PathLike | None, db: str | URL | None) -> tuple[Path, URL]:
    """The home folder and the state store's URL. The default store, ``<home>/state.db``, gets a
    URL built from the path (``URL.create``), so that a folder named ``50%20off`` or ``exp?a`` is
    that folder; ``db`` (or ``$PIPELINE_DB``) is parsed as a URL (``%``, ``?`` and ``#`` in a
    path there are written ``%25``, ``%3F``, ``%23``). StoreError for text that is not a URL."""
    from sqlalchemy.engine import URL

    from pipeline.store import parse_url

    home_path = Path(home or os.environ.get("PIPELINE_HOME") or ".pipeline").absolute()
    text = db or os.environ.get("PIPELINE_DB")
    if not text:
        return home_path, URL.create("sqlite", database=str(home_path / "state.db"))
    return home_path, parse_url(text)


def prepare(home: str | os.PathLike | None, db: str | URL | None) -> tuple[Path, URL]:
    """Resolve home and db; create home when the state store is a SQLite file."""
    home_path, url = resolve_paths(home, db)
    if url.get_backend_name() == "sqlite":
        make_home_folder(home_path, home_path)
    return home_path, url


def make_home_folder(folder: Path, home_path: Path) -> Path:
    """``folder`` (the home, or a folder in it), made with its parents if needed; HomeError
    naming it and saying what to do when it cannot be (a read-only file system, no permission,
    a file where a folder should be)."""
    if folder != home_path:
        make_home_folder(home_path, home_path)  # a home that cannot be made is named as the home
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        what = "the home folder" if folder == home_path else f"the folder {folder.name!r} in the home {home_path}"
        reason = exc.strerror or str(exc)
        if isinstance(exc, (FileExistsError, NotADirectoryError)):
            reason += ": a file is in the way of a folder on that path"
        raise HomeError(f"cannot create {what} ({folder}): {reason}; point the home at a folder you can write "
                        f"with {flag('--home DIR (or $PIPELINE_HOME)', 'home= (or $PIPELINE_HOME)')}, "
                        "or run from a folder you can write (the default home is ./.pipeline)") from exc
    return folder


def open_state(home: str | os.PathLike | None = None, db: str | URL | None = None, *,
               read_only: bool = False) -> tuple[Path, Store]:
    """The home folder and the state store (a SQLite file upgraded on open; a PostgreSQL database
    at an older revision refused: see pipeline.store.open_store). ``read_only`` (commands that
    only read): the home is not created, and a SQLite store in a folder that cannot be written
    is still read (:func:`pipeline.store.sqlite.read_only_fallback`)."""
    from pipeline.store import open_store

    home_path, url = resolve_paths(home, db) if read_only else prepare(home, db)
    try:
        return home_path, open_store(url)
    except StoreError as exc:
        if url.get_backend_name() != "sqlite":
            raise
        from pipeline.store import sqlite

        fallback = sqlite.read_only_fallback(url, exc) if read_only else None
        if fallback is None:
            explained = sqlite.unwritable_folder(url, exc)
            if explained is not None:
                raise explained from exc
            raise
    return home_path, open_store(fallback, upgrade=False)


def _read_only_fallback(url: URL, error: StoreError) -> URL | None:
    if url.get_backend_name() != "sqlite":
        return None
    from pipeline.store.sqlite import read_only_fallback

    return read_only_fallback(url, error)


def missing_store(home: str | os.PathLike | None, db: str | URL | None) -> Path | None:
    """The SQLite file of the state store when it does not exist yet, else None. Commands that
    only read answer from this instead of creating an empty store: they change nothing."""
    _, url = resolve_paths(home, db)
    if url.get_backend_name() != "sqlite":
        return None
    from pipeline.store.sqlite import sqlite_file

    path = sqlite_file(url)
    if path is None or path.exists():
        return None
    blocker = next((p for p in path.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():  # `runs` said "no runs yet" of a home that is a file
        raise HomeError(f"there can be no state store at {path}: {blocker} is a file, not a folder; point "
                        f"{flag('--home', 'home=')} at a folder (or {flag('--db', 'db=')} at a file in one)")
    return path


def require_run_store(home: str | os.PathLike | None, db: str | None, run_id: str) -> None:
    """RunNotFoundError naming ``run_id`` when the state store does not exist yet (nothing is
    created)."""
    path = missing_store(home, db)
    if path is not None:
        raise RunNotFoundError(f"no run with id {run_id!r}: there is no state store at {path} yet; "
                               f"check {flag('--home/--db', 'home=/db=')} ({flag('`pipeline runs`', '`pipeline.list_runs()`')} "
                               "lists the runs)")


def require_store(home: str | os.PathLike | None, db: str | None) -> None:
    """StoreError when the state store does not exist yet (nothing is created)."""
    path = missing_store(home, db)
    if path is not None:
        raise StoreError(f"there is no state store at {path} yet; check {flag('--home/--db', 'home=/db=')}, "
                         "or start a run first")


def validate_run_id(run_id: str) -> str:
    """``run_id`` itself, or InvalidRunIdError: 1 to 64 letters, digits, '.', '_' or '-',
    starting with a letter or digit."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise InvalidRunIdError(f"invalid run id {run_id!r}: use 1 to 64 letters, digits, '.', '_' or '-', "
                                f"starting with a letter or digit")
    return run_id


def query(sql: str, *, home: str | os.PathLike | None = None, db: str | None = None) -> tuple[list[str], list[tuple]]:
    """Run one read-only statement on the state store (what `pipeline sql` prints):
    ``(column names, rows)``, each row a tuple of Python values. It reads only, whatever the
    text, on a connection that cannot write (:mod:`pipeline.store.readonly`): ReadOnlyQueryError
    for a statement refused, StoreError for the database's own errors and when there is no
    state store yet (nothing is created)."""
    require_store(home, db)
    _, store = open_state(home, db, read_only=True)
    try:
        return store.read_query(sql)
    finally:
        store.close()


def db_upgrade(*, home: str | os.PathLike | None = None, db: str | None = None) -> str:
    """Migrate the state store to the newest schema (`pipeline db upgrade`; creates a SQLite
    file that does not exist yet) and return its revision now. StoreError when the database
    cannot be reached or is newer than this version."""
    from pipeline.store import migrate

    _, url = prepare(home, db)
    migrate.upgrade(url)
    return migrate.current(url)


def db_current(*, home: str | os.PathLike | None = None, db: str | None = None) -> dict[str, Any]:
    """The state store's schema revision (`pipeline db current`); creates nothing:
    ``{"current": revision, or None for a database with no schema yet, "head": the newest
    revision this version knows, "missing": the SQLite file's path when it does not exist yet
    (then "current" is None), else None}``."""
    from pipeline.store import migrate

    _, url = resolve_paths(home, db)
    missing = missing_store(home, db)
    current = None
    if not missing:
        try:
            current = migrate.current(url)
        except StoreError as exc:
            fallback = _read_only_fallback(url, exc)
            if fallback is None:
                raise
            current = migrate.current(fallback)
    return {"current": current, "head": migrate.head(),
            "missing": None if missing is None else str(missing)}
