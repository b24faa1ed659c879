"""Smoke tests of scripts/bench_lifecycle.py and scripts/bench_robustness.py (--quick, seconds each)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def run(script: str, out: Path) -> dict:
    subprocess.run([sys.executable, str(SCRIPTS / script), "--quick", "--out", str(out)], check=True, timeout=300,
                   capture_output=True)
    return json.loads(out.read_text())


def test_bench_lifecycle_quick(tmp_path):
    data = run("bench_lifecycle.py", tmp_path / "lc.json")
    ups = [r for r in data["records"] if r["experiment"] == "upcycle"]
    assert {r["method"] for r in ups} == {"dense", "upcycle-copy", "upcycle-drop", "scratch-moe"}
    copy = next(r for r in ups if r["method"] == "upcycle-copy")
    drop = next(r for r in ups if r["method"] == "upcycle-drop")
    assert copy["step0_max_abs_diff"] <= 1e-6 < drop["step0_max_abs_diff"]
    merges = [r for r in data["records"] if r["experiment"] == "merge"]
    assert {r["method"] for r in merges} == {"merge-group", "merge-group-noalign", "merge-dominant", "merge-average", "keep-group", "prune"}
    assert all(r["experts_after"] == 4 and 0 <= r["acc_after"] <= 1 for r in merges)
    agg = [r for r in data["records"] if r["experiment"] == "aggregate"]
    assert {(r["model"], r["combine"]) for r in agg} == {(m, c) for m in ("prediction-moe", "moe-mlp")
                                                         for c in ("router", "uniform", "pessimistic")}
    assert all(Path(p).is_file() for p in data["plots"]) and len(data["plots"]) == 3


def test_bench_robustness_quick(tmp_path):
    data = run("bench_robustness.py", tmp_path / "rob.json")
    probes = {(r["probe"], r["severity"]) for r in data["table"]}
    for p in ("gaussian_noise", "translate", "fgsm", "pgd"):
        assert {(p, s) for s in (1, 2, 3)} <= probes
    assert {("clean", 0), ("shortcut-id", 0), ("shortcut-ood", 0)} <= probes
    rows = {(r["probe"], r["severity"]): r for r in data["table"]}
    for m in ("moe", "control"):
        # a PGD attack at the largest budget hurts more than at the smallest
        assert rows[("pgd", 3)][m]["mean"] < rows[("pgd", 1)][m]["mean"] <= rows[("clean", 0)][m]["mean"] + 0.02
    moe = next(r for r in data["records"] if r["model"] == "moe")
    ctl = next(r for r in data["records"] if r["model"] == "control")
    # the control matches the MoE's active parameters up to the router rows (8 x 64 vs 1 x 64)
    assert abs(moe["active_params"] - ctl["active_params"]) <= 7 * 64 and ctl["active_params"] < moe["params"]
    assert Path(data["plots"][0]).is_file()


def _strip(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in records]


def test_bench_lifecycle_quick_is_deterministic_under_its_seeds(tmp_path):
    a = run("bench_lifecycle.py", tmp_path / "a.json")
    b = run("bench_lifecycle.py", tmp_path / "b.json")
    assert _strip(a["records"]) == _strip(b["records"])


def test_bench_robustness_quick_is_deterministic_under_its_seeds(tmp_path):
    a = run("bench_robustness.py", tmp_path / "a.json")
    b = run("bench_robustness.py", tmp_path / "b.json")
    assert _strip(a["records"]) == _strip(b["records"])
