"""The error tree drawn in pipeline.errors' docstring is the tree of its classes, and the
package's public names resolve."""

from __future__ import annotations

import inspect
import re

import pipeline
import pipeline.api
import pipeline.errors as errors


def _drawn_tree() -> dict[str, str | None]:
    """{class name: parent name} as drawn in the module docstring (box-drawing indentation)."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, name)
    for line in errors.__doc__.splitlines():
        match = re.match(r"^([ │]*(?:[├└]── )?)([A-Z][A-Za-z]+Error)\b", line)
        if not match:
            continue
        column, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= column:
            stack.pop()
        parents[name] = stack[-1][1] if stack else None
        stack.append((column, name))
    return parents


def test_the_drawn_error_tree_is_the_tree_of_the_classes():
    classes = {name: cls for name, cls in vars(errors).items()
               if inspect.isclass(cls) and issubclass(cls, BaseException) and cls.__module__ == errors.__name__}
    drawn = _drawn_tree()
    assert set(drawn) == set(classes), "every error class is drawn, and only those"
    for name, parent in drawn.items():
        actual = classes[name].__bases__[0]
        expected = classes[parent] if parent else Exception
        assert actual is expected, f"{name} derives from {actual.__name__}, drawn under {parent}"


def test_every_error_a_user_can_meet_derives_from_pipeline_error():
    for name in errors.__all__:
        obj = getattr(errors, name)
        if inspect.isclass(obj):
            assert issubclass(obj, errors.PipelineError), name


def test_model_errors_of_the_client_are_the_ones_in_the_tree():
    from pipeline.llm import client

    assert client.ModelOutputError is errors.ModelOutputError
    assert client.ModelRequestError is errors.ModelRequestError


def test_the_package_exports_resolve_and_cover_the_api():
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None, name
    # pipeline.api.graph stays out of the package's names: `pipeline.graph` is the module of the
    # column DAG, which replaces any function of that name once it is imported.
    public_functions = {name for name in pipeline.api.__all__
                        if inspect.isfunction(getattr(pipeline.api, name))} - {"open_state", "validate_run_id", "graph"}
    assert public_functions <= set(pipeline.__all__), public_functions - set(pipeline.__all__)
