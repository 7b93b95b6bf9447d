"""Advice in messages names what the caller can type: a flag or a command when the `pipeline`
command line runs, the parameter or the function when a program (or a notebook) calls the
Python API. ``pipeline.cli`` sets :data:`CLI` once, at start."""

from __future__ import annotations

__all__ = ["CLI", "command", "flag"]

#: True in the `pipeline` command; False (the default) for the Python API.
CLI = False


def flag(cli: str, python: str) -> str:
    """``cli`` (a flag: ``--accept-changes``) under the command line, else ``python``
    (a parameter: ``accept_changes=True``)."""
    return cli if CLI else python


def command(name: str, run_id: str, cli_args: str = "", python_args: str = "") -> str:
    """A command to run next, quoted: ```pipeline resume ID --repair``` on the command line,
    ```pipeline.resume('ID', repair=True)``` in Python."""
    if CLI:
        return f"`pipeline {name} {run_id}{' ' + cli_args if cli_args else ''}`"
    return f"`pipeline.{name}({run_id!r}{', ' + python_args if python_args else ''})`"
