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
        for key in ("forward_sorted_us", "forward_dense_us", "train_sorted_us", "train_dense_us"):
            assert r[key] > 0
        assert r["auto_dense"] == (r["unrouted_macs"] <= data["dense_macs"])
