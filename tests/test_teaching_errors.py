"""Errors that say what to do: an undeclared column read by a python column, a key pasted into
api_key_env, a base_url without its scheme, a key variable set to nothing."""

from __future__ import annotations

import json
import textwrap
import uuid
from pathlib import Path

import pytest

from tests.conftest import cli, cli_env

FNS = '''
def undeclared(row):
    return len(row["title"])

def undeclared_get(row):
    return row.get('title') or ""

def declared(row):
    return len(row["title"]) + row["stars"]

def batch_undeclared(df):
    return df["title"].str.len()

def own_key_error(row):
    return {"a": 1}["zzz"]  # not a column of the config: the function's own KeyError
'''


def project(tmp_path: Path, function: str, mode: str = "cell", requires: str = "[stars]") -> Path:
    folder = tmp_path / "p"
    folder.mkdir(exist_ok=True)
    (folder / "teach_fns.py").write_text(FNS)
    cfg = folder / f"{function}.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: teach
        num_records: 6
        row_group_size: 3
        columns:
          - {{name: stars, type: sampler, sampler: integer, params: {{low: 1, high: 5}}}}
          - {{name: title, type: expression, expr: "T{{{{ stars }}}}"}}
          - {{name: size, type: python, function: "teach_fns:{function}", requires: {requires}, mode: {mode}}}
        """))
    return cfg


def failures(home: Path, stdout: str) -> list[dict]:
    run_id = stdout.splitlines()[0].removeprefix("run_id: ")
    return json.loads(cli("status", run_id, "--json", home=home, check=True).stdout)["failures"]


@pytest.mark.parametrize("mode, function", [("cell", "undeclared"), ("batch", "batch_undeclared")])
@pytest.mark.slow
def test_a_python_column_reading_an_undeclared_column_fails_naming_it_and_the_requires_to_write(
        tmp_path, mode, function):
    home = tmp_path / "home"
    proc = cli("run", str(project(tmp_path, function, mode)), "--quiet", home=home)
    [failure] = failures(home, proc.stdout)
    assert failure["column"] == "size" and failure["error"] == "UndeclaredColumnError"
    assert "column 'size' read 'title'" in failure["example"]
    assert "`requires: [stars, title]`" in failure["example"]
    assert "`requires: [stars, title]`" in proc.stderr  # the summary shows it too


def test_a_key_error_of_the_users_own_is_left_as_it_is(tmp_path):
    from pipeline.config import load_config
    from pipeline.errors import UndeclaredColumnError
    from pipeline.generators import build_generators

    generator = build_generators(load_config(project(tmp_path, "own_key_error")))["size"]
    with pytest.raises(KeyError) as caught:
        generator.generate({"stars": 1})
    assert not isinstance(caught.value, UndeclaredColumnError)
    with pytest.raises(KeyError, match="requires: \\[stars, title\\]") as undeclared:  # still a KeyError
        build_generators(load_config(project(tmp_path, "undeclared")))["size"].generate({"stars": 1})
    assert isinstance(undeclared.value, UndeclaredColumnError)


@pytest.mark.parametrize("function, read", [("undeclared", "'title'"), ("undeclared_get", "'title'")])
def test_the_config_check_warns_when_the_function_visibly_reads_an_undeclared_column(tmp_path, function, read):
    cfg = project(tmp_path, function)
    proc = cli("validate", str(cfg))
    assert proc.returncode == 0, proc.stderr  # a warning, not an error
    assert f"column 'size' reads {read}" in proc.stderr
    assert "requires: [stars, title]" in proc.stderr and "warning" in proc.stderr
    assert "reads" not in proc.stdout
    declared = cli("validate", str(project(tmp_path, "declared", requires="[stars, title]")), check=True)
    assert "warning" not in declared.stderr


def test_the_requires_advised_for_an_undeclared_read_leaves_out_a_misspelt_entry(tmp_path):
    """`requires: [strs]` (a typo) with `row["title"]` read advised `requires: [strs, title]`,
    keeping the typo in the fix; the run is refused for the typo all the same."""
    proc = cli("validate", str(project(tmp_path, "undeclared", requires="[strs]")))
    assert proc.returncode == 2
    assert "`requires: [title]`" in proc.stderr and "strs, title" not in proc.stderr
    assert "'strs'" in proc.stderr  # the error names the typo


@pytest.mark.slow
def test_a_base_url_without_a_scheme_is_refused_with_the_fix(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent("""\
        name: noscheme
        num_records: 2
        models:
          local: {base_url: "localhost:8000/v1", model: m}
        columns:
          - {name: a, type: llm_text, model: local, prompt: "hi"}
        """))
    home = tmp_path / "home"
    for command in ("validate", "run", "preview"):
        proc = cli(command, str(cfg), home=home)
        assert proc.returncode == 2, (command, proc.stderr)
        assert "has no scheme" in proc.stderr and "http://localhost:8000/v1" in proc.stderr
    assert not home.exists()
    cfg.write_text(cfg.read_text().replace("localhost:8000/v1", "ftp://localhost:8000/v1"))
    assert "http:// or https://" in cli("validate", str(cfg)).stderr


@pytest.mark.parametrize("shape", ["sk-proj-{hex}"] + [pytest.param(shape, marks=pytest.mark.slow) for shape in
                                                         ("{hex}{hex}", "nvapi-{hex}", "hf_{hex}", "Bearer {hex}")])
def test_a_key_pasted_into_api_key_env_is_never_echoed_by_any_command(tmp_path, shape):
    key = shape.format(hex=uuid.uuid4().hex)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        name: pasted
        num_records: 2
        models:
          m: {{base_url: "http://127.0.0.1:9/v1", model: x, api_key_env: "{key}", extra: 1}}
        columns:
          - {{name: a, type: llm_text, model: m, prompt: "hi"}}
        """))
    home = tmp_path / "home"
    for command in ("validate", "run", "preview", "graph"):
        proc = cli(command, str(cfg), home=home)
        assert proc.returncode == 2, (command, proc.stderr)
        assert "api_key_env must be the NAME of an environment variable" in proc.stderr
        assert key[3:] not in proc.stdout + proc.stderr and key[3:10] not in proc.stderr
    assert not home.exists()


@pytest.mark.parametrize("model_extra, variable, says", [
    ("api_key_env: PIPELINE_TEST_KEY", "PIPELINE_TEST_KEY", "takes its API key from the environment variable"),
    pytest.param("extra_headers: {X-Token: {env: PIPELINE_TEST_TOKEN}}", "PIPELINE_TEST_TOKEN",
                 "extra_headers.X-Token is read", marks=pytest.mark.slow),
])
def test_a_variable_set_to_nothing_is_told_apart_from_one_not_set(tmp_path, model_extra, variable, says):
    (tmp_path / "cfg.yaml").write_text(textwrap.dedent(f"""\
        name: emptykey
        num_records: 2
        models:
          m: {{base_url: "http://127.0.0.1:9/v1", model: x, {model_extra}}}
        columns:
          - {{name: a, type: llm_text, model: m, prompt: "hi"}}
        """))
    home = tmp_path / "home"
    # `MYKEY= pipeline validate cfg.yaml`
    for command in ("validate", "run"):
        proc = cli(command, "cfg.yaml", home=home, cwd=tmp_path, env=cli_env(**{variable: ""}))
        assert proc.returncode == 2, (command, proc.stderr)
        assert f"{says}" in proc.stderr and f"{variable}, which is set but empty; export {variable}=" in proc.stderr
    assert not home.exists()
    proc = cli("validate", "cfg.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and f"{variable}, which is not set" in proc.stderr, proc.stderr
