"""A python column reads only the columns its ``requires`` lists: the record it gets holds those
and nothing else. Two helps for the mistake of reading another one:

- at run time, :func:`explain_key_error` turns the KeyError of ``row["title"]`` (a cell
  function's dict) or ``df["title"]`` (a batch function's DataFrame), for a column ``title`` of
  the config that the column does not declare, into :class:`~pipeline.errors.UndeclaredColumnError`
  (a KeyError too) naming the column and the ``requires`` to write. It looks at the error only
  once it is raised: nothing is added to a cell that succeeds (no wrapper around the record);
  the price is that a KeyError of the function's own dicts whose key happens to be an
  undeclared column's name gets the same advice;
- at config time, :func:`undeclared_reads` looks at the function's source, where that is cheap
  (``inspect.getsource`` and one ``ast`` walk), for ``row["x"]``, ``row['x']`` and
  ``row.get("x")`` (``row``: the function's first parameter) with an undeclared ``x``, so that
  the config check can warn before the first record fails.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from typing import Any, Collection, Sequence

from pipeline.errors import UndeclaredColumnError

__all__ = ["explain_key_error", "undeclared_message", "undeclared_reads"]


def undeclared_message(column: str, key: Any, declared: Sequence[str], known: Collection[str], *,
                       verb: str = "read") -> str:
    """What to say when python column ``column`` reads ``key``, which its requires (``declared``)
    does not list; ``known``: every output column of the config."""
    if isinstance(key, str) and key in known:
        fix = ", ".join([*(d for d in declared if d in known), key])  # a misspelt entry is not kept
        return (f"column '{column}' {verb} {key!r}, which is not in its requires (the record a python column "
                f"gets holds only those columns); declare it: `requires: [{fix}]`")
    has = ", ".join(declared) or "none"
    return (f"column '{column}' {verb} {key!r}, and the config has no column {key!r}; the record holds only the "
            f"columns in its requires ({has}): fix the name, or add the column and list it in requires")


def explain_key_error(exc: KeyError, column: str, declared: Sequence[str], known: Collection[str]
                      ) -> UndeclaredColumnError | None:
    """For a python function's KeyError: the teaching error when the missing key is a column of
    the config (``known``) that ``declared`` does not list, else None (the KeyError is the
    function's own)."""
    key = exc.args[0] if len(exc.args) == 1 else None
    if isinstance(exc, UndeclaredColumnError) or not isinstance(key, str) or key in declared:
        return None
    if key not in known:
        return None  # some other mapping's key: not ours to explain
    return UndeclaredColumnError(undeclared_message(column, key, declared, known))


def undeclared_reads(func: Any, declared: Collection[str]) -> list[str]:
    """Keys the source of ``func`` visibly reads from its first parameter (``p["x"]``,
    ``p.get("x")``) that ``declared`` does not list, in order of appearance. Empty when the
    source cannot be had (a builtin, a lambda in a REPL) or does not parse."""
    try:
        source = textwrap.dedent(inspect.getsource(func))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, ValueError):
        return []
    target = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if target is None or not target.args.args:
        return []
    param = target.args.args[0].arg
    found: list[str] = []
    for node in sorted(ast.walk(target), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0))):
        key = None
        if isinstance(node, ast.Subscript) and _is_name(node.value, param):
            key = _text(node.slice)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and _is_name(node.func.value, param) and node.args):
            key = _text(node.args[0])
        if key is not None and key not in declared and key not in found:
            found.append(key)
    return found


def _is_name(node: ast.AST, name: str) -> bool:
    return isinstance(node, ast.Name) and node.id == name


def _text(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None
