"""Advice in messages names what the caller can type: a flag or a command when the `pipeline`
command line runs, the parameter or the function when a program (or a notebook) calls the
Python API. ``pipeline.cli`` sets :data:`CLI` once, at start."""

from __future__ import annotations

__all__ = ["CLI", "PLACE", "command", "flag"]

#: True in the `pipeline` command; False (the default) for the Python API.
CLI = False
#: In the `pipeline` command: the --home/--db it was typed with, as flags to repeat after
#: another command (``pipeline.cli_text.place``), so that an advised command works as printed.
PLACE = ""


def flag(cli: str, python: str) -> str:
    """``cli`` (a flag: ``--accept-changes``) under the command line, else ``python``
    (a parameter: ``accept_changes=True``)."""
    return cli if CLI else python


def command(name: str, run_id: str, cli_args: str = "", python_args: str = "") -> str:
    """A command to run next, quoted: ```pipeline resume ID --repair``` on the command line (with
    :data:`PLACE`), ```pipeline.resume('ID', repair=True)``` in Python."""
    if CLI:
        return f"`pipeline {name} {run_id}{' ' + cli_args if cli_args else ''}{PLACE}`"
    return f"`pipeline.{name}({run_id!r}{', ' + python_args if python_args else ''})`"
