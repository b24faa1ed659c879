"""Smoke test of scripts/bench_core.py (the full run is `make bench-core`, marked slow here)."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_core.py"


def _main():
    return runpy.run_path(str(SCRIPT), run_name="bench_core")["main"]


def test_bench_core_quick_smoke(tmp_path):
    out = tmp_path / "core.json"
    records = _main()(["--quick", "--out", str(out), "--impls", "dense", "moeparadigms", "moeparadigms-grouped",
                       "moeparadigms-capacity", "naive-loop", "moeparadigms-glu", "--no-memory"])
    data = json.loads(out.read_text())
    assert data["records"] == records
    impls = {r["impl"] for r in records}
    assert impls == {"dense", "moeparadigms", "moeparadigms-grouped", "moeparadigms-capacity", "naive-loop", "dense-glu",
                     "moeparadigms-glu"}

    for r in records:
        assert set(r) >= {"E", "k", "impl", "median_s", "ratio_vs_dense", "peak_mb"}
        assert r["median_s"] > 0 and len(r["times_s"]) == 2
    dense = [r for r in records if r["impl"] == "dense"]
    assert all(r["ratio_vs_dense"] == 1.0 for r in dense)


def test_bench_core_grouped_step_runs_the_grouped_path_and_restores_the_choice(monkeypatch):
    from moeparadigms.core import _kernels, grouped_ffn

    ns = runpy.run_path(str(SCRIPT), run_name="bench_core")
    shape = ns["Shape"](tokens=64, d_model=16, hidden=32, E=4, k=2)
    _, step = ns["build"]("moeparadigms-grouped", shape)
    x, g = ns["_inputs"](shape, 0)
    seen = []
    ext = _kernels.extension
    monkeypatch.setattr(_kernels, "extension", lambda: seen.append(grouped_ffn.FUSED) or ext())
    step(x, g)
    assert grouped_ffn.FUSED, "the bench's choice of expert path must not leak out of its step"
    if _kernels.available():
        assert seen == [], "the grouped step must not ask for the fused kernel"


def test_bench_core_peak_memory_subprocess():
    ns = runpy.run_path(str(SCRIPT), run_name="bench_core")
    shape = ns["Shape"](tokens=128, d_model=32, hidden=64, E=4, k=2)
    mem = ns["peak_memory"]("moeparadigms", shape, 1)
    # activations alone: 128 tokens x 2 choices x 64 hidden x 4 bytes = 64 KiB, so well above 0.05 MB
    assert mem["peak_mb"] is not None and 0.05 < mem["peak_mb"] < 50


def test_bench_core_rejects_bad_arguments():
    with pytest.raises(SystemExit):
        _main()(["--quick", "--impls", "tutel"])


@pytest.mark.slow
def test_bench_core_full(tmp_path):
    _main()(["--out", str(tmp_path / "core.json")])
