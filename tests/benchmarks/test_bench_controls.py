"""Smoke run of scripts/bench_controls.py (seconds): records in issue 14's shape, controls paired by seed, verdicts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_controls_quick(tmp_path):
    out = tmp_path / "controls.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_controls.py"), "--quick", "--out", str(out),
                        "--methods", "ppo-moe", "ppo-moe-dense-trunk", "ppo-moe-hash"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    keys = {"paradigm", "benchmark", "method", "control", "seed", "metric", "higher_is_better", "value"}
    assert all(keys <= rec.keys() for rec in data["records"])
    assert {(rec["method"], rec["control"], rec["seed"]) for rec in data["records"]} == {
        (m, c, s) for m, c in [("ppo-moe", None), ("ppo-moe-dense-trunk", "dense-same-trunk"),
                               ("ppo-moe-hash", "moe-fixed-routing")] for s in (0, 1)}
    # the control has the MoE's active parameters in its one expert (the routers' few weights aside)
    active = {rec["method"]: rec["active_params"] for rec in data["records"]}
    assert abs(active["ppo-moe"] - active["ppo-moe-dense-trunk"]) <= 4 * 64 + 4
    (effect,) = data["effects"]
    assert effect["method"] == "ppo-moe" and effect["control"] in ("ppo-moe-dense-trunk", "ppo-moe-hash")
    assert effect["ci_low"] <= effect["diff"] <= effect["ci_high"] and effect["verdict"] in ("helps", "hurts", "no evidence")
    assert "| rl | CartPole-v1 |" in data["markdown"] and "IQM" in r.stdout
    # --resume runs nothing new when every run is there
    r2 = subprocess.run([sys.executable, str(ROOT / "scripts/bench_controls.py"), "--quick", "--resume", "--out", str(out),
                         "--methods", "ppo-moe", "ppo-moe-dense-trunk", "ppo-moe-hash"],
                        capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and len(json.loads(out.read_text())["records"]) == 6
