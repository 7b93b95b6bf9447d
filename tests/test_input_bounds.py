"""Numbers out of range are refused before anything is created: exit 2, a message naming the
file, the key and the allowed range, and no home folder or state store left behind."""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.conftest import cli

BASE = {"name": "big", "num_records": 10}
COLUMNS = textwrap.dedent("""\
    columns:
      - {name: id, type: sampler, sampler: uuid}
      - {name: n, type: sampler, sampler: integer, params: {low: 1, high: 9}}
    """)
MODEL_COLUMNS = textwrap.dedent("""\
    columns:
      - {name: id, type: sampler, sampler: uuid}
      - {name: t, type: llm_text, model: w, prompt: "hi {{ id }}"}
    """)

CASES = {
    "num_records 2**63": ({"num_records": 2**63}, ["num_records", f"{2**63 - 1}"]),
    "seed 2**63": ({"seed": 2**63}, ["seed", f"{2**63 - 1}"]),
    "seed below -2**63": ({"seed": -(2**63) - 1}, ["seed", f"{-(2**63)}"]),
    "row_group_size 2**63": ({"row_group_size": 2**63}, ["row_group_size", "2147483647"]),
    "row_group_size 2**31": ({"row_group_size": 2**31}, ["row_group_size", "2147483647"]),
    "10**12 records in row groups of 1": ({"num_records": 10**12, "row_group_size": 1},
                                          ["num_records", "row_group_size", "2,147,483,647", "row groups"]),
    "2**63-1 records": ({"num_records": 2**63 - 1}, ["num_records", "row_group_size", "row groups"]),
    "lease_s infinite": ({"settings": "{lease_s: .inf}"}, ["settings.lease_s", "finite"]),
    "lease_s tiny": ({"settings": "{lease_s: 0.000001}"}, ["settings.lease_s", "0.1"]),
    "max_in_flight_tasks 2**63": ({"settings": f"{{max_in_flight_tasks: {2**63}}}"},
                                  ["settings.max_in_flight_tasks", "1000000"]),
    "max_concurrent_row_groups 10**9": ({"settings": "{max_concurrent_row_groups: 1000000000}"},
                                        ["settings.max_concurrent_row_groups", "10000"]),
    "salvage_max_rounds 10**6": ({"settings": "{salvage_max_rounds: 1000000}"}, ["settings.salvage_max_rounds", "30"]),
    "retry_backoff_s 1e300": ({"settings": "{retry_backoff_s: 1.0e+300}"}, ["settings.retry_backoff_s", "3600"]),
    "shutdown_error_window 2**63": ({"settings": f"{{shutdown_error_window: {2**63}}}"},
                                    ["settings.shutdown_error_window", "1000000"]),
    "model timeout_s nan": ({"models": "{w: {base_url: 'http://127.0.0.1:9/v1', model: m, timeout_s: .nan}}"},
                            ["models.w.timeout_s", "finite"]),
    "model max_parallel_requests 2**63": (
        {"models": f"{{w: {{base_url: 'http://127.0.0.1:9/v1', model: m, max_parallel_requests: {2**63}}}}}"},
        ["models.w.max_parallel_requests", "1000000"]),
}


def write_config(tmp_path, fields: dict, columns: str = COLUMNS):
    text = "".join(f"{k}: {v}\n" for k, v in {**BASE, **fields}.items()) + columns
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.slow
def test_a_number_out_of_range_is_refused_before_anything_is_created(tmp_path, case):
    fields, expected = CASES[case]
    cfg = write_config(tmp_path, fields)
    home = tmp_path / "home"
    proc = cli("run", str(cfg), "--create-only", home=home)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for text in [str(cfg), *expected]:
        assert text in proc.stderr, (text, proc.stderr)
    assert not home.exists()


@pytest.mark.slow
def test_an_llm_column_with_max_tokens_out_of_range_is_refused(tmp_path):
    cfg = write_config(tmp_path, {"models": "{w: {base_url: 'http://127.0.0.1:9/v1', model: m}}"},
                       MODEL_COLUMNS.replace('prompt: "hi {{ id }}"', 'prompt: "hi {{ id }}", max_tokens: 4294967296'))
    proc = cli("run", str(cfg), "--create-only", home=tmp_path / "home")
    assert proc.returncode == 2 and "max_tokens" in proc.stderr and "2147483647" in proc.stderr, proc.stderr
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("value,expected", [
    (str(2**63), ["--num-records", f"{2**63 - 1:,}"]),
    (str(10**12), ["--num-records", "row_group_size", "row groups"]),
])
@pytest.mark.slow
def test_num_records_on_the_command_line_is_bounded_too(tmp_path, value, expected):
    cfg = write_config(tmp_path, {"row_group_size": 1})
    proc = cli("run", str(cfg), "--create-only", "--num-records", value, home=tmp_path / "home")
    assert proc.returncode == 2, proc.stderr
    for text in [str(cfg), *expected]:
        assert text in proc.stderr, (text, proc.stderr)
    assert not (tmp_path / "home").exists()


@pytest.mark.parametrize("seed", [2**63 - 1, -(2**63)])
@pytest.mark.slow
def test_the_extreme_seeds_the_store_holds_run_and_resume(tmp_path, seed):
    cfg = write_config(tmp_path, {"seed": seed, "row_group_size": 4})
    home = tmp_path / "home"
    cli("run", str(cfg), "--run-id", "s", "--quiet", home=home, check=True)
    assert json.loads(cli("status", "s", "--json", home=home, check=True).stdout)["records_done"] == 10
    assert cli("resume", "s", "--quiet", home=home).returncode == 0
