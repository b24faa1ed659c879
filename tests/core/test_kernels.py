"""The CPU grouped GEMM against torch.mm, with pieces split across two threads."""
from __future__ import annotations

import pytest
import torch

from moeparadigms.core import _kernels


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_grouped_mm_out_matches_mm(transposed, bias):
    if not _kernels.available():
        pytest.skip("the grouped-GEMM extension cannot be built here")
    torch.set_num_threads(2)
    sizes = [0, 1, 700, 33, 2000, 5]
    K, N = 24, 40
    if transposed:  # weight-gradient shape: a = x^T, rows of a are x's columns
        xs = [torch.randn(n, 300, dtype=torch.float64) for n in sizes]
        a = [x.t() for x in xs]
        b = [torch.randn(n, N, dtype=torch.float64) for n in sizes]
    else:
        a = [torch.randn(n, K, dtype=torch.float64) for n in sizes]
        b = [torch.randn(K, N, dtype=torch.float64).t().contiguous().t() for _ in sizes]  # column-major view too
    bb = [torch.randn(N, dtype=torch.float64) for _ in sizes] if bias else None
    c = [torch.full((x.shape[0], N), float("nan"), dtype=torch.float64) for x in a]
    _kernels.grouped_mm_out(a, b, c, bias=bb)
    for g, (x, y, z) in enumerate(zip(a, b, c)):
        expected = x @ y + (bb[g] if bias else 0)
        if x.shape[0] and x.shape[1]:
            torch.testing.assert_close(z, expected)


def test_experts_run_under_inference_mode():
    """Lightning validates/tests under torch.inference_mode; the extension's worker threads must be
    allowed to write into inference tensors (inference mode is thread-local)."""
    from moeparadigms.core import MLPExperts, MoE, TopKRouter

    torch.manual_seed(0)
    m = MoE(router=TopKRouter(d_model=32, num_experts=4, top_k=2),
            experts=MLPExperts(d_model=32, hidden=64, num_experts=4, backend="loop"))
    x = torch.randn(256, 32)
    with torch.no_grad():
        a = m(x).y
    with torch.inference_mode():
        b = m(x).y
    assert torch.equal(a, b)
