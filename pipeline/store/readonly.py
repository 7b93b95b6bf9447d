"""What `pipeline sql` lets through: one statement that only reads, checked before it runs.

This is the first of three layers (the second and third are the database's own: a connection
that is read-only for its whole life, and for SQLite an authorizer that allows reads only; see
``read_query`` in :mod:`pipeline.store.sqlite` and :mod:`pipeline.store.postgres`). The text is
split and tokenized with sqlparse, a real SQL lexer, so that quotes, dollar quotes and comments
are understood, and then:

- it must hold exactly one statement (``COMMIT; UPDATE ...`` would end the read-only
  transaction and write);
- that statement must start with SELECT, WITH, VALUES or EXPLAIN (SQLite also PRAGMA: one that
  only reads, or with an argument one that reads a table's layout, checked by name, its argument
  being a value and not SQL; the authorizer checks it again; PostgreSQL also SHOW and TABLE);
- no keyword of a write or of a side effect may appear anywhere in it: a data-modifying CTE
  (``WITH x AS (DELETE ... RETURNING *) SELECT ...``), ``SELECT ... INTO``, a locking clause
  (``FOR UPDATE``, ``FOR SHARE``, ..., refused as that), COPY (``COPY ... TO PROGRAM`` runs a
  program on the server, and COPY TO a file is allowed in a read-only transaction), ATTACH,
  VACUUM (``VACUUM INTO`` writes a file), ...;
- no function from :data:`REFUSED_FUNCTIONS` may be named: those that read or write the
  server's files, large objects, signals to other sessions, settings, and those that run SQL
  given as text (which would get around this check).

What is left is guarded by the database: PostgreSQL refuses any write in a read-only transaction
(code 25006), and SQLite opens the file read-only with ``query_only``.
"""

from __future__ import annotations

import sqlparse
from sqlparse import tokens as T

from pipeline.errors import ReadOnlyQueryError

__all__ = ["ALLOWED_FIRST", "INTROSPECTION_PRAGMAS", "READ_PRAGMAS", "REFUSED_FUNCTIONS", "REFUSED_WORDS",
           "refused_function", "single_read_statement"]

#: The first keyword of an allowed statement, per dialect.
ALLOWED_FIRST = {
    "sqlite": frozenset({"SELECT", "WITH", "VALUES", "EXPLAIN", "PRAGMA"}),
    "postgresql": frozenset({"SELECT", "WITH", "VALUES", "EXPLAIN", "SHOW", "TABLE"}),
}

#: Keywords refused anywhere in the statement (outside strings and comments).
REFUSED_WORDS = frozenset({
    "INSERT", "UPDATE", "DELETE", "MERGE", "UPSERT", "INTO", "SHARE",  # writes, row locks
    "CREATE", "DROP", "ALTER", "TRUNCATE", "GRANT", "REVOKE", "COMMENT", "REINDEX", "CLUSTER",
    "REFRESH", "VACUUM",
    "COPY", "ATTACH", "DETACH", "LOAD", "IMPORT",
    "BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "ABORT", "PREPARE", "EXECUTE",
    "DEALLOCATE", "DECLARE", "CALL", "DO", "SET", "RESET", "DISCARD", "LOCK", "LISTEN", "NOTIFY",
    "UNLISTEN", "CHECKPOINT", "SECURITY",
})

#: Functions refused by name (lower case); an entry ending in ``_`` is a prefix. PostgreSQL:
#: server files (pg_read_server_files), large objects (lo_import reads a server file), other
#: sessions and the server (signals, WAL, replication, statistics resets), settings
#: (set_config('role', ...)), sequences, and functions that execute SQL text (query_to_xml,
#: ts_stat, dblink). SQLite: extension loading and the tokenizer pointer of fts3.
REFUSED_FUNCTIONS = frozenset({
    "pg_read_", "pg_ls_", "pg_stat_file", "pg_file_", "pg_current_logfile",
    "lo_", "loread", "lowrite",
    "pg_terminate_backend", "pg_cancel_backend", "pg_signal_", "pg_reload_conf", "pg_rotate_logfile",
    "pg_log_", "pg_switch_", "pg_wal_", "pg_backup_", "pg_create_", "pg_drop_", "pg_promote",
    "pg_replication_", "pg_logical_", "pg_copy_", "pg_sync_", "pg_import_", "pg_truncate_",
    "pg_stat_reset", "pg_advisory_", "pg_try_advisory_", "pg_notify",
    "set_config", "nextval", "setval",
    "query_to_", "cursor_to_", "database_to_", "schema_to_", "ts_stat", "dblink",
    "load_extension", "fts3_tokenizer", "readfile", "writefile", "edit",
})

#: SQLite: PRAGMAs that only read, without an argument (`PRAGMA optimize` or `wal_checkpoint`
#: without one would write; the authorizer of :mod:`pipeline.store.sqlite` allows these too) ...
READ_PRAGMAS = frozenset(
    {"table_list", "database_list", "collation_list", "function_list", "module_list", "pragma_list",
     "compile_options", "encoding", "journal_mode", "page_count", "page_size", "freelist_count",
     "schema_version", "user_version", "application_id", "data_version", "foreign_keys",
     "integrity_check", "quick_check", "foreign_key_check"}
)
#: ... and with one: they only read a table's or index's layout (or check it).
INTROSPECTION_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "table_list", "index_list", "index_info", "index_xinfo",
     "foreign_key_list", "foreign_key_check", "integrity_check", "quick_check"}
)


_HINT = ("`pipeline sql` runs one statement that only reads: SELECT, WITH ... SELECT, VALUES or "
         "EXPLAIN (PRAGMA reads on SQLite, SHOW and TABLE on PostgreSQL)")


def _refuse(reason: str, sql: str) -> ReadOnlyQueryError:
    return ReadOnlyQueryError(f"{_HINT}; refused: {reason}: {' '.join(sql.split())[:200]}")


def _significant(statement) -> list:
    return [t for t in statement.flatten() if not t.is_whitespace and t.ttype not in T.Comment]


def refused_function(name: str) -> bool:
    """Whether a function of this name is refused (:data:`REFUSED_FUNCTIONS`)."""
    name = name.lower()
    return any(name.startswith(f) if f.endswith("_") else name == f for f in REFUSED_FUNCTIONS)


def _locking_clause(tokens: list, i: int) -> str | None:
    """``FOR UPDATE``, ``FOR NO KEY UPDATE``, ``FOR SHARE`` or ``FOR KEY SHARE`` when the token at
    ``i`` starts one, else None."""
    if tokens[i].value.upper() != "FOR":
        return None
    words = [t.value.upper() for t in tokens[i + 1:i + 4]]
    for clause in (["UPDATE"], ["SHARE"], ["NO", "KEY", "UPDATE"], ["KEY", "SHARE"]):
        if words[:len(clause)] == clause:
            return " ".join(["FOR", *clause])
    return None


def _check_pragma(rest: list, sql: str) -> None:
    """A SQLite PRAGMA (``rest``: the tokens after the word, ``[schema.]name [= value |
    (argument)]``): one that only reads (no argument), or one that reads a table's or index's
    layout (with one); ReadOnlyQueryError naming the PRAGMA otherwise. Its argument is a value,
    not SQL: ``journal_mode = delete`` is a PRAGMA that sets a value, not a DELETE."""
    if len(rest) >= 2 and rest[1].value == ".":  # schema-qualified: main.journal_mode
        rest = rest[2:]
    name = rest[0].value.strip('"`[]') if rest else ""
    argument = rest[1:]
    if not argument:
        if name.lower() not in READ_PRAGMAS:
            raise _refuse(f"PRAGMA {name or 'without a name'} (it writes, or is not one of the PRAGMAs that only "
                          "read; see the README's list)", sql)
        return
    if argument[0].value == "=":
        raise _refuse(f"a PRAGMA that sets a value (PRAGMA {name} = ...); PRAGMAs that only read take no value", sql)
    if name.lower() not in INTROSPECTION_PRAGMAS:
        raise _refuse(f"PRAGMA {name}(...), which with an argument sets a value or acts; of the PRAGMAs that take "
                      "an argument, only those that read a table's or index's layout are allowed", sql)


def single_read_statement(sql: str, dialect: str) -> str:
    """The one statement of ``sql`` (its text, as given) if it passes the checks of this
    module for ``dialect`` (``"sqlite"`` or ``"postgresql"``); else ReadOnlyQueryError saying why."""
    statements = [s for s in sqlparse.parse(sql) if any(t.ttype is not T.Punctuation for t in _significant(s))]
    if not statements:
        raise _refuse("there is no statement", sql)
    if len(statements) > 1:
        raise _refuse(f"{len(statements)} statements; give one (no ';' between statements)", sql)
    statement = statements[0]
    tokens = _significant(statement)
    first = next((t for t in tokens if t.ttype is not T.Punctuation), None)
    word = first.value.upper() if first is not None else ""
    if word not in ALLOWED_FIRST[dialect]:
        raise _refuse(f"a statement starting with {word or 'nothing'}", sql)
    if word == "PRAGMA":
        _check_pragma(tokens[tokens.index(first) + 1:], sql)
        return str(statement).strip()
    for i, token in enumerate(tokens):
        ttype, value = token.ttype, token.value
        if ttype in T.Keyword or ttype in T.Name:
            upper = value.upper()
            clause = _locking_clause(tokens, i)
            if clause is not None:
                raise _refuse(f"the locking clause {clause} (it takes row locks, which a query that only "
                              "reads does not)", sql)
            if upper in REFUSED_WORDS:
                raise _refuse(f"{upper} (it writes or has effects beyond this query)", sql)
            if refused_function(value):
                raise _refuse(f"the function {value} (see the README's list)", sql)
        elif ttype in T.String.Symbol:  # a quoted identifier: "lo_import"(...)
            if i > 1 and tokens[i - 1].value == "&" and tokens[i - 2].value.upper() == "U":
                raise _refuse("a Unicode-escaped identifier (U&\"...\")", sql)
            if refused_function(value.strip('"`[]')):
                raise _refuse(f"the function {value} (see the README's list)", sql)
    return str(statement).strip()
