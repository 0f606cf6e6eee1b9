"""``dynamo-ext bench engines``: the engine and disk benchmarks' README tables come from a
command. The pool benchmark (no engine, seconds) runs for real here; the others' rendering
is checked on their JSON shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dynamo_ext.benchmarks import engines_report as er


def test_the_last_json_object_is_the_result_indented_or_not() -> None:
    assert er._last_json('progress\n{"a": 1}\n') == {"a": 1}
    assert er._last_json('x\n{\n  "b": [1,\n 2]\n}\n') == {"b": [1, 2]}
    try:
        er._last_json("no json here\n")
    except ValueError:
        pass
    else:
        raise AssertionError("expected ValueError")


def test_a_failed_or_unexpected_result_is_reported_and_the_rest_rendered() -> None:
    res = {
        "command": "dynamo-ext bench engines",
        "wall_s": 1.0,
        "host": {"cpus": 2, "load_avg_1m": 0.1},
        "results": "r.json",
        "benches": {
            "serve": {"command": "c", "wall_s": 1.0, "failed": 3, "stderr_tail": "boom"},
            "prefill": {"command": "c", "wall_s": 1.0, "result": {"unexpected": True}},
        },
    }
    md = er.markdown(res)
    assert "Failed (3)" in md and "Result not rendered (KeyError" in md


def test_engines_writes_the_pool_table_into_the_readme(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{er.BEGIN}\nold figures\n{er.END}\ntail\n")
    out = subprocess.run(
        [sys.executable, "-m", "dynamo_ext.cli", "bench", "engines", "--only", "pool",
         "--out-dir", str(tmp_path), "--readme", str(readme)],
        capture_output=True, text=True, timeout=600, check=True,
    ).stdout  # fmt: skip
    assert json.loads(out.strip().splitlines()[-1])["failed"] == []
    res = json.loads((tmp_path / "bench-engines.json").read_text())
    pool = res["benches"]["pool"]["result"]
    text = readme.read_text()
    assert "old figures" not in text and text.startswith("head\n") and text.endswith("tail\n")
    cold = pool["regimes"]["cold"]
    assert f"| cold | {cold['write_mb_s_pool']} / {cold['write_mb_s_plain']} |" in text
    assert "`dynamo-ext bench engines --only pool" in text
