"""A template Jinja2 refuses is a config error (contract section 3): every command that reads the
config exits 2 naming the file, the column, the field, what is wrong and the fix, before anything
is created, and ``pipeline.validate()`` raises ConfigError; a template that fails for one record
at run time fails that cell only, saying why."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from tests.conftest import cli
from tests.llm_run_helpers import export_jsonl, server_stats, status_json

#: case -> (template, what stderr says)
BAD = {
    "unknown filter": ("{{ a | nosuchfilter }}", ["no filter named 'nosuchfilter'", "list-of-builtin-filters"]),
    "misspelt filter": ("{{ a | upperr }}", ["no filter named 'upperr' (did you mean 'upper'?)"]),
    "unknown test": ("{{ a is nosuchtest }}", ["no test named 'nosuchtest'", "list-of-builtin-tests"]),
    # the compiler leaves a filter inside {% if %} to render time: it would fail every record there
    "filter in a branch": ("{% if a > 3 %}{{ a | lenght }}{% endif %}",
                           ["no filter named 'lenght' (did you mean 'length'?)"]),
    "include": ('Hello {% include "header.txt" %}', ["{% include %} loads another template"]),
    "block defined twice": ("{% block b %}{% endblock %}{% block b %}{% endblock %}", ["block 'b' defined twice"]),
    "nested too deeply": ("{{ " + "(" * 120 + "a" + ")" * 120 + " }}", ["nests too deeply"]),
}


def config(folder: Path, field: str, template: str, url: str = "http://127.0.0.1:9/v1") -> Path:
    """cfg.yaml with ``template`` as the ``field`` (expr, prompt or system_prompt) of column 'b'."""
    folder.mkdir(parents=True, exist_ok=True)
    if field == "expr":
        column = f"{{name: b, type: expression, expr: {json.dumps(template)}}}"
    elif field == "prompt":
        column = f"{{name: b, type: llm_text, model: m, prompt: {json.dumps(template)}}}"
    else:
        column = f"{{name: b, type: llm_text, model: m, prompt: hi, system_prompt: {json.dumps(template)}}}"
    (folder / "cfg.yaml").write_text(textwrap.dedent(f"""\
        name: templates
        num_records: 8
        row_group_size: 8
        seed: 3
        settings: {{shutdown_error_rate: 1.0}}
        models:
          m: {{base_url: "{url}", model: m1}}
        columns:
          - {{name: a, type: sampler, sampler: integer, params: {{low: 1, high: 6}}}}
          - {column}
        """))
    return folder / "cfg.yaml"


@pytest.mark.parametrize("field", ["expr"] + [pytest.param(field, marks=pytest.mark.slow)
                                             for field in ("prompt", "system_prompt")])
@pytest.mark.parametrize("case", list(BAD))
def test_a_template_jinja2_refuses_is_refused_naming_file_column_field_and_fix(tmp_path, case, field):
    template, expected = BAD[case]
    config(tmp_path, field, template)
    proc = cli("validate", "cfg.yaml", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"error: cfg.yaml: column 'b': {field}: Jinja2" in proc.stderr, proc.stderr
    for text in expected:
        assert text in proc.stderr, (text, proc.stderr)


@pytest.mark.parametrize("field", ["expr", "prompt"])
def test_every_command_refuses_an_unknown_filter_before_creating_anything(tmp_path, field):
    config(tmp_path, field, BAD["unknown filter"][0])
    home = tmp_path / "home"
    for command in ("run", "graph", "preview"):
        proc = cli(command, "cfg.yaml", home=home, cwd=tmp_path)
        assert proc.returncode == 2, (command, proc.stderr)
        assert "Traceback" not in proc.stderr
        assert f"cfg.yaml: column 'b': {field}: Jinja2 error" in proc.stderr, (command, proc.stderr)
        assert "no filter named 'nosuchfilter'" in proc.stderr
    assert not home.exists()


def test_the_library_validate_raises_config_error_for_an_unknown_filter(tmp_path):
    from pipeline import validate
    from pipeline.errors import ConfigError

    for case in ("unknown filter", "unknown test"):
        cfg = config(tmp_path / case.replace(" ", "_"), "expr", BAD[case][0])
        with pytest.raises(ConfigError, match="no (filter|test) named 'nosuch"):
            validate(cfg)


# Jinja2 looks up a filter named in a string (map("...")) only when it renders: records with
# a > 3 fail, the others render.
RUNTIME = '{% if a > 3 %}{{ [a] | map("nosuchfilter") | join }}{% else %}v{{ a }}{% endif %}'


@pytest.mark.slow
def test_a_template_that_fails_at_render_time_fails_only_its_cells(tmp_path):
    config(tmp_path, "expr", RUNTIME)
    home = tmp_path / "home"
    proc = cli("run", "cfg.yaml", "--run-id", "x", "--quiet", home=home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows, status = export_jsonl("x", home, tmp_path / "out.jsonl"), status_json("x", home)
    assert rows and all(r["a"] <= 3 and r["b"] == f"v{r['a']}" for r in rows)
    [failure] = status["failures"]
    assert failure["count"] == 8 - len(rows) > 0
    assert "column 'b'" in failure["example"] and "No filter named 'nosuchfilter'" in failure["example"]


@pytest.mark.slow
def test_a_prompt_that_fails_at_render_time_fails_its_cell_naming_column_and_field_without_a_request(
        tmp_path, fake_server):
    url = fake_server(latency_ms=1)
    config(tmp_path, "prompt", RUNTIME, url=url)
    home = tmp_path / "home"
    proc = cli("run", "cfg.yaml", "--run-id", "x", "--quiet", home=home, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows, status = export_jsonl("x", home, tmp_path / "out.jsonl"), status_json("x", home)
    assert rows and all(r["a"] <= 3 for r in rows)
    assert server_stats(url)["models"]["m1"]["requests"] == len(rows)
    [failure] = status["failures"]
    assert failure["count"] == 8 - len(rows) > 0
    assert "column 'b': prompt: the template failed" in failure["example"]
    assert "No filter named 'nosuchfilter'" in failure["example"]
