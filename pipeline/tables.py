"""Tables printed by the command line (rich): a header, aligned columns, no borders, and no
wrapping when the output is a pipe or a file, so that every row stays one line for `grep`/`awk`.
rich is imported by the commands that print one, not with every command."""

from __future__ import annotations

import sys
from typing import Iterable, Sequence

__all__ = ["print_table"]


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]], *, right: Iterable[int] = (),
                whole: Iterable[int] = (0,)) -> None:
    """Print ``rows`` under ``header`` on stdout; the columns whose index is in ``right`` (counts)
    are aligned right; those in ``whole`` (ids a user copies) are never cut or wrapped. On a
    terminal, rich fits the other columns to its width; elsewhere lines are as long as the
    longest row."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    aligned, kept = set(right), set(whole)
    cells = [[str(v) for v in row] for row in rows]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, header_style="bold")
    for i, name in enumerate(header):
        widest = max([len(name), *(len(row[i]) for row in cells)])
        table.add_column(name, justify="right" if i in aligned else "left", no_wrap=i in aligned or i in kept,
                         min_width=widest if i in kept else None, overflow="ellipsis" if i not in kept else "fold")
    for row in cells:
        table.add_row(*row)
    tty = sys.stdout.isatty()
    console = Console(soft_wrap=False, width=None if tty else 100_000, highlight=False)
    console.print(table, crop=tty)
