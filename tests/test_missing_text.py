"""A missing text value is None wherever a user meets it (CONTRACT section 10): in what a batch
function receives, in pipeline.load_dataset and in exports, with pandas 3's str dtype too."""

from __future__ import annotations

import json
import textwrap

from tests.conftest import cli, cli_env

FNS = '''
import json, os

def maybe(row):
    return None if row["n"] % 2 else f"text{row['n']}"

def look(df):
    with open(os.environ["SEEN_FILE"], "a") as f:
        for v in df["m"]:
            f.write(json.dumps([type(v).__name__, v if isinstance(v, str) or v is None else repr(v)]) + "\\n")
    return [0] * len(df)
'''


def test_missing_text_is_none_in_batch_functions_load_dataset_and_exports(tmp_path):
    (tmp_path / "fns.py").write_text(FNS)
    cfg = tmp_path / "p.yaml"
    cfg.write_text(textwrap.dedent("""\
        name: nn
        num_records: 6
        row_group_size: 6
        columns:
          - {name: n, type: sampler, sampler: integer, params: {low: 0, high: 1000}}
          - {name: m, type: python, function: "fns:maybe", requires: [n]}
          - {name: b, type: python, function: "fns:look", mode: batch, requires: [m]}
    """))
    home, seen = tmp_path / "home", tmp_path / "seen.jsonl"
    cli("run", str(cfg), "--run-id", "nn", "--quiet", home=home, check=True, env=cli_env(SEEN_FILE=str(seen)))
    got = [json.loads(line) for line in seen.read_text().splitlines()]
    assert len(got) == 6 and {kind for kind, _ in got} <= {"str", "NoneType"}
    assert any(kind == "NoneType" for kind, _ in got), got
    probe = ("import json, pipeline; df = pipeline.load_dataset('nn', home=%r); "
             "print(json.dumps([[type(v).__name__, v] for v in df['m']]))" % str(home))
    import subprocess
    import sys

    from tests.conftest import ROOT
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=cli_env(),
                         check=True).stdout
    loaded = json.loads(out)
    assert [kind for kind, _ in loaded] == [kind for kind, _ in got], (loaded, got)
    exported = tmp_path / "out.jsonl"
    cli("export", "nn", "--output", str(exported), home=home, check=True)
    rows = [json.loads(line) for line in exported.read_text().splitlines()]
    assert [r["m"] for r in rows] == [v for _, v in loaded]
