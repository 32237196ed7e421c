# scripts/gpu_check.sh --dry-run: every step of the prepared GPU check on the CPU with tiny shapes and eager steps,
# so that a lent GPU's minutes are not spent on a broken script.
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def check(out: Path, tests: bool):
    res = json.loads((out / "results.json").read_text())
    assert res["dry_run"] and res["environment"]["device"] == "cpu"
    assert [(r["model"], r["bits"]) for r in res["bench"]] == [("chatglm3-6b", 0), ("chatglm-6b", 4),
                                                               ("chatglm3-6b", 4), ("chatglm-6b", 0)]
    for r in res["bench"]:
        assert "error" not in r, r
        assert r["decode_ms"] > 0 and r["eager_decode_ms"] > 0 and r["fraction_of_floor"] > 0
    assert [r["clients"] for r in res["serving"]["rows"]] == [1, 2, 4]
    assert all(r["tokens_per_s"] > 0 for r in res["serving"]["rows"])
    if tests:  # without a GPU the CUDA tests are collected and skipped
        t = res["tests"]
        assert t["returncode"] == 0 and t["skipped"] > 0 and t["passed"] == t["failed"] == t["error"] == 0
    table = (out / "table.txt").read_text()
    assert "chatglm-6b" in table and "streams" in table


def test_driver_dry_run(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--out", str(tmp_path), "--dry-run",
                    "--skip-tests"], check=True, capture_output=True, timeout=600)
    check(tmp_path, tests=False)


@pytest.mark.slow
def test_script_dry_run(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], check=True, env=env,
                   capture_output=True, timeout=600)
    check(tmp_path, tests=True)
