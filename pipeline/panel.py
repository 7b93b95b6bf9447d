"""The live panel of a run: the same view for `run`/`resume`/`worker` on stderr and for
`pipeline status --watch`.

What it shows comes from the state store, so every worker of a run sees the whole run (not its
own share): records done / total, dropped, the rate over the last :data:`RATE_WINDOW_S` seconds
(a run over before two views ends on its engine's records done / elapsed) and the ETA at that
rate (records per second everywhere), per column done / deferred / failed /
in flight (and truncated answers, where counted), per model requests, 429s, the limit in force,
tokens per second (and cost, where prices are configured), and the live workers with the row
groups they hold.

On a terminal it is a `rich` Live display cropped to the terminal (it never wraps: every line is
cut to the width, the tables drop to what fits in the height) and redrawn at most
:data:`REFRESH_PER_S` times a second; when stderr is not a terminal it prints one plain line every
``every_s`` seconds and one at the end.

A view is the dict of :func:`pipeline.api.status` (``pipeline status --json``) plus:

- ``leases``: ``{worker: [row group, ...]}`` of unexpired leases (:meth:`Store.leases`);
- ``live``: optional facts of this process: ``in_flight`` (tasks), ``models`` (``{alias:
  {"limit": n}}``, the concurrency limit in force) and ``stopping`` (a message once a signal
  came).
"""

from __future__ import annotations

import collections
import shutil
import sys
import time
from typing import IO, Any

from pipeline.costs import money
from pipeline.states import RunStatus

__all__ = ["LivePanel", "RateWindow", "plain_line", "render"]

#: The rate (and so the ETA) is measured over this many recent seconds.
RATE_WINDOW_S = 30.0
#: A terminal panel is redrawn at most this often.
REFRESH_PER_S = 4


class RateWindow:
    """Records per second over the last ``window_s`` seconds of samples ``(t, records)``."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, t: float, records: int) -> float | None:
        """Add a sample; return the rate (None until two samples span some time)."""
        self.samples.append((t, records))
        while len(self.samples) > 2 and t - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        (t0, r0), (t1, r1) = self.samples[0], self.samples[-1]
        if t1 - t0 <= 0:
            return None
        return max(0.0, (r1 - r0) / (t1 - t0))


def progress_records(view: dict[str, Any]) -> int:
    """Records every column has finished (the slowest column's done count)."""
    return min((c["done"] for c in view.get("columns", {}).values()), default=0)


def _eta(view: dict[str, Any], rate: float | None) -> float | None:
    if view.get("status") == RunStatus.COMPLETE:
        return 0.0
    if not rate or view.get("status") != RunStatus.RUNNING:  # a stopped run has no end to foresee
        return None
    left = view["num_records"] - progress_records(view) - view.get("records_dropped", 0)
    return max(0.0, left / rate)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _headline(view: dict[str, Any], rate: float | None) -> tuple[str, str]:
    """Two lines: the run, its state and row groups; then records, rate and ETA."""
    done, total = view.get("records_done", 0), view.get("num_records", 0)
    first = f"run {view.get('run_id', '?')}: {view.get('status', '?')}"
    groups = view.get("row_groups") or {}
    if groups:
        first += f" | row groups {groups.get('checkpointed', 0):,}/{groups.get('total', 0):,}"
    second = (f"records {done:,}/{total:,} | dropped {view.get('records_dropped', 0):,} | "
              f"{'-' if rate is None else f'{rate:,.1f}'} records/s | ETA {_duration(_eta(view, rate))}")
    return first, second


def _model_cells(alias: str, usage: dict[str, Any], live: dict[str, Any], elapsed_s: float | None) -> list[str]:
    tokens = usage.get("prompt_tokens", 0) + usage.get("completion_tokens", 0)
    limit = live.get("limit", usage.get("limit"))
    cost = usage.get("cost")
    per_s = f"{tokens / elapsed_s:,.0f}" if elapsed_s else "-"
    return [alias, f"{usage.get('requests', 0):,}", f"{usage.get('rate_limited', 0):,}",
            "-" if limit is None else str(limit), per_s, money(cost)]


def render(view: dict[str, Any], rate: float | None, *, width: int, height: int) -> Any:
    """The panel as a rich renderable that fits ``width`` x ``height`` (cut, never wrapped)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def line(text: str, style: str = "") -> Text:
        out = Text(text, style=style, no_wrap=True, overflow="ellipsis")
        out.truncate(width, overflow="ellipsis")
        return out

    live = view.get("live") or {}
    first, second = _headline(view, rate)
    parts: list[Any] = [line(first, "bold"), line(second)]
    if live.get("stopping"):
        parts.append(line(live["stopping"], "yellow"))
    columns = view.get("columns") or {}
    models = view.get("models") or {}
    leases = view.get("leases") or {}
    # Lines left for the tables: each table costs a header line plus its rows.
    room = max(height - len(parts) - 1 - (1 if leases else 0) - (1 + len(models) if models else 0) - 1, 1)
    table = Table(box=None, pad_edge=False, show_edge=False, width=width, expand=False)
    truncated = any(c.get("truncated") for c in columns.values())  # shown once some answer was cut
    for name, justify in [("column", "left"), ("done", "right"), ("deferred", "right"), ("failed", "right"),
                          ("in flight", "right")] + ([("truncated", "right")] if truncated else []):
        table.add_column(name, justify=justify, no_wrap=True, overflow="ellipsis")
    shown = list(columns.items())
    if len(shown) > room:
        shown = shown[: max(room - 1, 0)]
    for name, c in shown:
        table.add_row(name, f"{c['done']:,}", f"{c['deferred']:,}", f"{c['failed']:,}", f"{c['in_flight']:,}",
                      *([f"{c.get('truncated', 0):,}"] if truncated else []))
    if len(shown) < len(columns):
        table.add_row(f"... {len(columns) - len(shown)} more", "", "", "", "", *([""] if truncated else []))
    parts.append(table)
    if models:
        elapsed = None
        if view.get("created_at"):
            elapsed = max((view.get("finished_at") or time.time()) - view["created_at"], 1e-6)
        mt = Table(box=None, pad_edge=False, show_edge=False, width=width, expand=False)
        for name in ("model", "requests", "429s", "limit", "tokens/s", "cost"):
            mt.add_column(name, justify="left" if name == "model" else "right", no_wrap=True, overflow="ellipsis")
        live_models = live.get("models") or {}
        for alias, usage in models.items():
            mt.add_row(*_model_cells(alias, usage, live_models.get(alias, {}), elapsed))
        parts.append(mt)
    if leases:
        held = ", ".join(f"{worker.split(':')[0]}:{worker.split(':')[1] if ':' in worker else ''} "
                         f"rg {_ranges(groups)}" for worker, groups in sorted(leases.items()))
        parts.append(line(f"workers {len(leases)}: {held}"))
    return Group(*parts)


def _ranges(numbers: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    out: list[str] = []
    for n in sorted(numbers):
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])
    return ",".join(f"{a}-{b}" if a != b else str(a) for a, b in out)


def plain_line(view: dict[str, Any], rate: float | None) -> str:
    """The panel as one line of plain text (stderr that is not a terminal)."""
    columns = " ".join(f"{name}={c['done']:,}" for name, c in (view.get("columns") or {}).items())
    first, second = _headline(view, rate)
    return f"{first} | {second} | {columns}"


class LivePanel:
    """Shows views as they come: :meth:`update` with each new view, :meth:`close` with the last.

    ``stream`` defaults to stderr; ``tty`` to whether it is a terminal. Not a terminal: one
    plain line every ``every_s`` seconds and one at :meth:`close`.
    """

    def __init__(self, *, stream: IO[str] | None = None, tty: bool | None = None, every_s: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self.rates = RateWindow()
        self.rate: float | None = None
        self._last_line = time.monotonic()  # the first plain line after every_s: it has a rate by then
        self._live: Any = None
        self._console: Any = None

    def update(self, view: dict[str, Any], *, final: bool = False, rate: float | None = None) -> None:
        """Show ``view``. ``rate``: the engine's records done / elapsed of this invocation, shown
        when the window has no rate yet, and by the final view when the window saw no progress
        (it held only samples taken after the last record: a run whose records were all done by
        its first view ended on "complete ... 0.0 records/s"). Otherwise the window's rate, which
        counts every worker's records, as the view does."""
        now = time.monotonic()
        measured = self.rates.add(now, progress_records(view))
        if measured is not None and (measured > 0 or not final):
            self.rate = measured
        elif rate is not None and (final or self.rate is None):
            self.rate = rate
        if not self.tty:
            if final or now - self._last_line >= self.every_s:
                self._last_line = now
                self.stream.write(plain_line(view, self.rate) + "\n")
                self.stream.flush()
            return
        if self._live is None:
            from rich.console import Console
            from rich.live import Live

            self._console = Console(file=self.stream, force_terminal=True, highlight=False, soft_wrap=False)
            # Lines written to stderr meanwhile (logged failures: logging's last-resort handler
            # writes to sys.stderr) are printed above the panel instead of through it.
            self._live = Live(console=self._console, auto_refresh=False, transient=False,
                              vertical_overflow="crop", redirect_stdout=False,
                              redirect_stderr=self.stream is sys.stderr)
            self._live.start()
        width, height = shutil.get_terminal_size((80, 24))
        width = min(width, self._console.width)
        self._live.update(render(view, self.rate, width=width, height=height - 1), refresh=True)

    def close(self, view: dict[str, Any] | None = None, *, rate: float | None = None) -> None:
        """Show the last ``view`` (``rate``: as for :meth:`update`) and stop."""
        if view is not None:
            self.update(view, final=True, rate=rate)
        if self._live is not None:
            self._live.stop()
            self._live = None
