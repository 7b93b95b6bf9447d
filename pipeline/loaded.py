"""A module some code has imported already, read without importing it.

Heavy libraries (numpy, pandas, SQLAlchemy) load only where a command needs them, so code that
merely recognises their values asks whether they are loaded: a numpy scalar cannot exist before
numpy is. Reading ``sys.modules`` alone is not enough: while another thread is importing the
module, ``sys.modules`` already holds it half-initialized, and an attribute read then fails
(``partially initialized module 'pandas' has no attribute 'DataFrame'``, seen in a resumed
run whose checkpoint thread was importing pandas). :func:`loaded` waits for that import to end.
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

__all__ = ["loaded"]


def loaded(name: str) -> ModuleType | None:
    """The module ``name`` if it is imported or being imported (then once that import has
    ended, in whatever thread it runs), else None; never starts an import."""
    module = sys.modules.get(name)
    if module is None:
        return None
    if getattr(getattr(module, "__spec__", None), "_initializing", False):
        # The import lock of the module is held by the importing thread: taking it waits for
        # the end (in the same thread, a circular import, it returns the module as it is).
        return importlib.import_module(name)
    return module
