"""`pipeline export RUN_ID --output DIR --card`: the data in DIR/data/train.<format> and a Hugging
Face dataset card in DIR/README.md whose YAML header describes that data exactly."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT, cli
from tests.test_failures import llm_config

QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def read_card(folder) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    assert text.startswith("---\n")
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


@pytest.mark.slow
def test_a_card_describes_the_exported_data_and_how_it_was_made(tmp_path):
    home = tmp_path / "home"
    cli("run", str(QUICKSTART), "--run-id", "qs", "--num-records", "120", "--quiet", home=home, check=True)
    out = tmp_path / "card"
    proc = cli("export", "qs", "--output", str(out), "--card", home=home)
    assert proc.returncode == 0, proc.stderr
    header, body = read_card(out)
    table = pq.read_table(out / "data" / "train.parquet")
    assert table.num_rows == 120
    info = header["dataset_info"]
    assert [f["name"] for f in info["features"]] == table.column_names
    assert info["splits"] == [{"name": "train", "num_bytes": (out / "data" / "train.parquet").stat().st_size,
                               "num_examples": 120}]
    assert header["configs"][0]["data_files"] == [{"split": "train", "path": "data/train.parquet"}]
    assert header["size_categories"] == ["n<1K"]
    types = {f["name"]: f.get("dtype") for f in info["features"]}
    assert types["stars"] == "int64" and types["title"] == "string"
    assert "```mermaid\ngraph TD" in body and "```yaml\nname: quickstart" in body
    assert "- written: 120" in body and "No task failed for good." in body


@pytest.mark.slow
def test_a_card_lists_drops_by_error_and_model_usage_in_jsonl(tmp_path, fake_server):
    url = fake_server(latency_ms=1)
    cfg = llm_config(tmp_path, url, records=20,
                     prompt="{% if k > 8 %}[[status:400]]{% endif %} item {{ id }}")
    home = tmp_path / "home"
    run = cli("run", str(cfg), "--run-id", "llm", "--quiet", home=home)
    assert run.returncode in (0, 1), run.stderr
    out = tmp_path / "card"
    cli("export", "llm", "--output", str(out), "--card", "--format", "jsonl", home=home, check=True)
    header, body = read_card(out)
    rows = (out / "data" / "train.jsonl").read_text().splitlines()
    assert header["dataset_info"]["splits"][0]["num_examples"] == len(rows)
    dropped = 20 - len(rows)
    assert dropped > 0, "the prompts of k = 9 fail with HTTP 400"
    assert f"- dropped: {dropped}" in body
    assert "| text | ModelRequestError |" in body
    assert "| writer |" in body and "## Model usage" in body


def test_card_refuses_a_file_as_its_folder(tmp_path):
    home = tmp_path / "home"
    cli("run", str(QUICKSTART), "--run-id", "qs", "--num-records", "10", "--quiet", home=home, check=True)
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    proc = cli("export", "qs", "--output", str(target), "--card", home=home)
    assert proc.returncode == 2 and "folder" in proc.stderr
    assert target.read_text() == "keep me"


@pytest.mark.slow
def test_card_writes_into_an_existing_folder_again(tmp_path):
    home = tmp_path / "home"
    cli("run", str(QUICKSTART), "--run-id", "qs", "--num-records", "10", "--quiet", home=home, check=True)
    out = tmp_path / "card"
    out.mkdir()
    for _ in range(2):  # an existing folder, then the card's own folder again
        proc = cli("export", "qs", "--output", str(out), "--card", home=home)
        assert proc.returncode == 0, proc.stderr
    assert (out / "README.md").is_file() and (out / "data" / "train.parquet").is_file()
