"""Smoke test of scripts/bench_core_kernel.py (the expert kernel alone and the options tried on it)."""
from __future__ import annotations

import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_core_kernel.py"


def test_bench_core_kernel_quick_smoke(tmp_path):
    from moeparadigms.core import grouped_ffn

    res = runpy.run_path(str(SCRIPT), run_name="bench_core_kernel")["main"](["--quick", "--out", str(tmp_path / "k.json")])
    assert {(r["E"], r["threads"]) for r in res["kernel"]} == {(8, 2), (64, 2), (8, 1), (64, 1)}
    for r in res["kernel"]:
        assert r["fused_ms"] > 0 and r["grouped_ms"] > 0 and r["act_recompute_ms"] > 0
    import torch

    if torch.backends.mkl.is_available():
        assert res["packed"]["mkl_packed_gemm_ms"] > 0 and res["packed"]["mkl_pack_weight_ms"] > 0
    assert all(f["moeparadigms_fault_mb"] >= 0 for f in res["faults"])
    assert (tmp_path / "k.json").exists()
    assert grouped_ffn.FUSED


def test_bench_core_kernel_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        runpy.run_path(str(SCRIPT), run_name="bench_core_kernel")["main"](["--reps", "0"])
