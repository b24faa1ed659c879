"""Smoke test of scripts/bench_small_batch.py (sorted vs dense small-batch MoE timing)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_small_batch.py"


def test_bench_small_batch_quick_smoke(tmp_path):
    out = tmp_path / "sb.json"
    subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], check=True, timeout=300)
    data = json.loads(out.read_text())
    assert [r["tokens"] for r in data["records"]] == [8, 64]
    for r in data["records"]:
        for key in ("forward_sorted_us", "forward_dense_us", "train_sorted_us", "train_dense_us", "forward_rollout_us",
                    "forward_mlp_us", "train_mlp_us", "forward_ratio", "train_ratio", "rollout_ratio"):
            assert r[key] > 0, key
        auto = "dense" if r["auto_dense"] else "sorted"
        assert r["fused"] == r["auto_dense"]  # 64/64/4/2 with a TopKRouter: auto trains through core/fused.py
        assert r["train_ratio"] == r[f"train_{'fused' if r['fused'] else auto}_us"] / r["train_mlp_us"]
        assert r["forward_ratio"] == r[f"forward_{auto}_us"] / r["forward_mlp_us"]
        assert r["mlp_hidden"] == r["top_k"] * r["hidden"]
        assert r["train_ops_mlp"] < r["train_ops_fused"] and r["train_ops_dense"] > 0
        assert r["auto_dense"] == (r["unrouted_macs"] <= data["dense_macs"])
    md = subprocess.run([sys.executable, str(SCRIPT), "--markdown", str(out)], check=True, capture_output=True, text=True)
    assert md.stdout.count("\n| 64 / 64 / 4 / 2 |") == 2 and "fwd+bwd ÷ MLP" in md.stdout
    assert "| 64 / 64 / 4 / 2 | 8 | fused |" in md.stdout
