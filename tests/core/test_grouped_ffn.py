"""The CPU expert kernel (GroupedFFN): every path (the fused per-expert extension kernel on one thread and
across threads, the per-GEMM grouped path, the Python loop without the extension) against a plain per-expert
autograd loop, outputs and every gradient."""
from __future__ import annotations

import pytest
import torch

from moeparadigms.core import GLUExperts, MLPExperts, _kernels, grouped_ffn
from moeparadigms.core.dispatch import topk_permutation

from .reference import expert_ref

D, H = 8, 6
COUNTS = [5, 0, 9, 3, 7, 4]  # an expert without rows; 5 live experts: the fused kernel runs them across 2 threads
FEW = [0, 12, 0, 7]  # 2 live experts (< 2 per thread): the fused kernel runs them one after another
BANKS = {
    "mlp-gelu-bias": lambda E: MLPExperts(d_model=D, hidden=H, num_experts=E, bias=True),
    "mlp-gelu_tanh": lambda E: MLPExperts(d_model=D, hidden=H, num_experts=E, activation="gelu_tanh"),
    "mlp-relu-bias": lambda E: MLPExperts(d_model=D, hidden=H, num_experts=E, activation="relu", bias=True),
    "mlp-silu": lambda E: MLPExperts(d_model=D, hidden=H, num_experts=E, activation="silu"),
    "swiglu-bias": lambda E: GLUExperts(d_model=D, hidden=H, num_experts=E, bias=True),
    "geglu": lambda E: GLUExperts(d_model=D, hidden=H, num_experts=E, activation="gelu"),
}


@pytest.fixture(params=["fused-1thread", "fused-2threads", "grouped", "python-loop"])
def path(request, monkeypatch):
    name = request.param
    if name != "python-loop" and not _kernels.available():
        pytest.skip("the extension cannot be built here")
    if name == "python-loop":
        monkeypatch.setattr(_kernels, "_load", lambda: None)
    monkeypatch.setattr(grouped_ffn, "FUSED", name.startswith("fused"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if name == "fused-1thread" else 2)
    yield name
    torch.set_num_threads(threads)


def _loop_ref(bank, x_AD, counts):
    """Each expert on its slice with plain autograd ops (tests/core/reference.py's expert_ref)."""
    outs, s = [], 0
    for e, n in enumerate(counts):
        outs.append(expert_ref(bank, e, x_AD[s : s + n]))
        s += n
    return torch.cat(outs)


def _grads(y, g, x, bank):
    params = [p for p in bank.parameters() if p.requires_grad]
    return torch.autograd.grad(y, [x, *params], g)


@pytest.mark.parametrize("sizes", [COUNTS, FEW], ids=["many", "few"])
@pytest.mark.parametrize("kind", sorted(BANKS))
def test_sorted_rows_match_the_loop(path, kind, sizes):
    torch.manual_seed(0)
    bank = BANKS[kind](len(sizes)).double()
    x = torch.randn(sum(sizes), D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(sum(sizes), D, dtype=torch.float64)
    counts = torch.tensor(sizes)
    y = bank(x, counts)
    ref = _loop_ref(bank, x, sizes)
    torch.testing.assert_close(y, ref)
    for got, want in zip(_grads(y, g, x, bank), _grads(ref, g, x, bank), strict=True):
        torch.testing.assert_close(got, want)
    with torch.no_grad():  # nothing kept for a backward: the same output
        torch.testing.assert_close(bank(x, counts), ref)
    with torch.inference_mode():
        torch.testing.assert_close(bank(x, counts), ref.detach())


@pytest.mark.parametrize("kind", ["mlp-gelu-bias", "swiglu-bias"])
def test_gathered_rows_and_frozen_blocks_match_the_loop(path, kind):
    """The top-k layout (rows gathered from token order inside the kernel), weights split in blocks by a
    frozen expert (its block gets no gradient), one expert without tokens."""
    torch.manual_seed(1)
    E, T, K = 6, 20, 2
    bank = BANKS[kind](E).double()
    bank.set_frozen([2])
    assert len(bank.w1.blocks) == 3
    ids = torch.stack([torch.randperm(E - 1)[:K] for _ in range(T)])  # expert E-1 never chosen
    perm = topk_permutation(ids, E)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(T * K, D, dtype=torch.float64)
    y = bank.forward_gathered(x, perm)
    ref = _loop_ref(bank, x[perm.token_A], perm.counts_E.tolist())
    torch.testing.assert_close(y, ref)
    got, want = _grads(y, g, x, bank), _grads(ref, g, x, bank)
    assert len(got) == 1 + 2 * 2 * 2  # x, and w1/w2/b1/b2 in two trainable blocks each
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_input_gradient_alone_and_weight_gradients_alone(path):
    torch.manual_seed(2)
    bank = BANKS["mlp-gelu-bias"](len(COUNTS)).double()
    counts = torch.tensor(COUNTS)
    x = torch.randn(sum(COUNTS), D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(sum(COUNTS), D, dtype=torch.float64)
    (gx,) = torch.autograd.grad(bank(x, counts), x, g)
    (want,) = torch.autograd.grad(_loop_ref(bank, x, COUNTS), x, g)
    torch.testing.assert_close(gx, want)
    xd = x.detach()
    params = list(bank.parameters())
    got = torch.autograd.grad(bank(xd, counts), params, g)
    want = torch.autograd.grad(_loop_ref(bank, xd, COUNTS), params, g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_gradients_accumulate_across_backwards(path):
    """Two steps into .grad (gradient accumulation) give the sum of the two steps' gradients."""
    torch.manual_seed(3)
    bank = BANKS["swiglu-bias"](len(COUNTS)).double()
    counts = torch.tensor(COUNTS)
    xs = [torch.randn(sum(COUNTS), D, dtype=torch.float64) for _ in range(2)]
    for x in xs:
        bank(x, counts).square().sum().backward()
    got = [p.grad.clone() for p in bank.parameters()]
    bank.zero_grad(set_to_none=True)
    for x in xs:
        _loop_ref(bank, x, COUNTS).square().sum().backward()
    for a, p in zip(got, bank.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("kind", ["mlp-gelu", "swiglu-bias"])
def test_autocast_grouped_mm_path_gathers_rows(kind, monkeypatch):
    """On CUDA, ``backend="auto"`` takes ``F.grouped_mm`` for rows that run in bf16, their own dtype or autocast's.
    Found on an H200: under autocast an fp32 input was judged by its own dtype (no grouped_mm, so no gather), then cast
    to bf16 and sent down the grouped_mm branch ungathered: T rows against offsets summing to T*k (a device assert on
    CUDA; on CPU a silent wrong result). Replayed on CPU by letting ``auto`` take grouped_mm there."""
    from moeparadigms.core import MoE, TopKRouter
    from moeparadigms.core import experts as experts_mod

    torch.manual_seed(0)
    E, k, T, d = 4, 2, 24, 16  # grouped_mm wants 16-byte strides: bf16 rows of 16
    bank = (MLPExperts(d_model=d, hidden=d, num_experts=E, activation="gelu") if kind == "mlp-gelu"
            else GLUExperts(d_model=d, hidden=d, num_experts=E, bias=True))
    moe = MoE(router=TopKRouter(d_model=d, num_experts=E, top_k=k), experts=bank, dense_dispatch=False)  # the sorted path
    x = torch.randn(T, d, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = moe(x).y.float()  # the fused CPU kernel (or the loop) on bf16 rows
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    monkeypatch.setattr(experts_mod, "GROUPED_MM_DEVICES", ("cpu", "cuda"))
    assert moe.experts._use_grouped_mm(x.to(torch.bfloat16)) and not moe.experts._use_grouped_mm(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert moe.experts._use_grouped_mm(x)  # judged by the autocast dtype it will run in
        y = moe(x).y.float()
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(g, g_ref, rtol=2e-2, atol=2e-2)
