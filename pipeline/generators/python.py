"""``python`` columns: a user function, or a user subclass of :class:`pipeline.Generator`.

``function: "module:callable"`` is imported with the config file's folder on ``sys.path``, so a
``mymodule.py`` next to the config just works. A plain function is wrapped so that the engine
sees the kind it is: a coroutine function only implements ``agenerate`` (awaited on the event
loop, no thread hop), a plain one only ``generate`` (run in the engine's thread pool).
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pipeline.generators.base import Generator
from pipeline.generators.row_reads import explain_key_error

if TYPE_CHECKING:
    from pipeline.config import PipelineConfig, PythonColumn

__all__ = [
    "AsyncFunctionGenerator",
    "FunctionGenerator",
    "import_callable",
    "make_python_generator",
    "module_source_file",
]

_path_lock = threading.Lock()


def _ensure_on_path(base_dir: Path) -> None:
    folder = str(Path(base_dir).resolve())
    with _path_lock:
        if folder not in sys.path:
            # First, so that the user's module wins over an installed one of the same name,
            # which is what "importable from the config's folder" promises.
            sys.path.insert(0, folder)
            importlib.invalidate_caches()


def import_callable(spec: str, base_dir: Path) -> Any:
    """The object ``spec`` ("module:attr" or "module:Class.attr") names.

    Raises ImportError with a message saying what is missing and where it was looked for.
    """
    module_name, _, attr_path = spec.partition(":")
    if not module_name or not attr_path:
        raise ImportError(f"function '{spec}' must look like 'module:callable', e.g. 'mymodule:count_words'")
    _ensure_on_path(base_dir)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name) and module_name[len(exc.name) : len(exc.name) + 1] in ("", "."):
            raise ImportError(
                f"cannot import module '{module_name}': no {module_name.replace('.', '/')}.py in "
                f"{Path(base_dir).resolve()} nor an installed module of that name; "
                "put the module next to the config file or fix the name"
            ) from exc
        raise ImportError(f"importing module '{module_name}' failed: {exc}; install what it imports") from exc
    except Exception as exc:
        raise ImportError(
            f"importing module '{module_name}' failed: {type(exc).__name__}: {exc}; fix the module"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportError(
                f"module '{module_name}' ({getattr(module, '__file__', '?')}) has no attribute "
                f"'{attr_path}'; define it there or fix the name in 'function'"
            ) from exc
    if not callable(obj):
        raise ImportError(f"'{spec}' is a {type(obj).__name__}, not a function or a Generator class")
    return obj


def module_source_file(spec: str, base_dir: Path) -> Path | None:
    """The source file of the module ``spec`` names, when there is one (for the fingerprint)."""
    module_name = spec.partition(":")[0]
    _ensure_on_path(base_dir)
    try:
        module = sys.modules.get(module_name) or importlib.import_module(module_name)
    except Exception:
        return None
    file = getattr(module, "__file__", None)
    if not file or not file.endswith(".py"):
        return None
    path = Path(file)
    return path if path.is_file() else None


def is_generator_class(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, Generator)


def _is_coroutine_function(func: Any) -> bool:
    if inspect.iscoroutinefunction(func):
        return True
    # A callable object whose __call__ is `async def` is awaited the same way.
    call = getattr(func, "__call__", None)
    return call is not None and not inspect.isfunction(func) and inspect.iscoroutinefunction(call)


class _Reads:
    """What a wrapped function may read, for the error when it reads another column
    (pipeline.generators.row_reads): its column's name, its requires, the config's columns."""

    def _reads(self, column: str, declared: tuple[str, ...], known: frozenset[str]) -> None:
        self.column, self.declared, self.known = column, declared, known

    def _explained(self, exc: KeyError) -> BaseException:
        return explain_key_error(exc, self.column, self.declared, self.known) or exc


class FunctionGenerator(_Reads, Generator):
    """Wraps a plain function: ``f(row)`` in cell mode, ``f(df)`` in batch mode."""

    def __init__(self, func: Callable[[Any], Any], *, outputs: tuple[str, ...], strategy: str, stateful: bool):
        self.func = func
        self.outputs = outputs
        self.strategy = strategy
        self.is_stateful = stateful
        self._reads(getattr(func, "__name__", "?"), (), frozenset())

    def generate(self, data: Any) -> Any:
        try:
            return self.func(data)
        except KeyError as exc:
            explained = self._explained(exc)
            if explained is exc:
                raise
            raise explained from exc

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self.func, '__qualname__', self.func)!r}, {self.strategy})"


class AsyncFunctionGenerator(_Reads, Generator):
    """Wraps an ``async def`` function; it is awaited on the event loop, never in a thread."""

    def __init__(self, func: Callable[[Any], Any], *, outputs: tuple[str, ...], strategy: str, stateful: bool):
        self.func = func
        self.outputs = outputs
        self.strategy = strategy
        self.is_stateful = stateful
        self._reads(getattr(func, "__name__", "?"), (), frozenset())

    async def agenerate(self, data: Any) -> Any:
        try:
            return await self.func(data)
        except KeyError as exc:
            explained = self._explained(exc)
            if explained is exc:
                raise
            raise explained from exc

    def __repr__(self) -> str:
        return f"{type(self).__name__}({getattr(self.func, '__qualname__', self.func)!r}, {self.strategy})"


def make_python_generator(column: PythonColumn, config: PipelineConfig) -> Generator:
    """The generator of a ``python`` column: the user's Generator subclass, created once, or a
    wrapper around the user's function. Mode and statefulness come from the validated column
    (config validation has already folded a Generator subclass's own ones into it)."""
    target = import_callable(column.function, config.base_dir)
    if is_generator_class(target):
        generator = target()
        generator.outputs = column.outputs
        # An instance attribute only where the config adds something: the class's own strategy
        # is what the config was validated against.
        if column.stateful and not target.is_stateful:
            generator.is_stateful = True
        return generator
    wrapper = AsyncFunctionGenerator if _is_coroutine_function(target) else FunctionGenerator
    generator = wrapper(target, outputs=column.outputs, strategy=column.mode, stateful=column.stateful)
    generator._reads(column.name, tuple(column.dependencies), frozenset(config.output_columns()))
    return generator
