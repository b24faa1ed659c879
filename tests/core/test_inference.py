"""The inference path (autograd off: RL rollouts, evaluation) and the fused dense small-batch path (issue 15).

With autograd off the layer skips the auxiliary losses (unless ``aux_in_inference``), keeps the routing statistics
unless ``stats_in_inference=False``, and never syncs the host for the finite-logits check; its output is the
same as with autograd on.
"""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from moeparadigms.core import MoE, SoftMoERouter, TaskConditionedRouter
from moeparadigms.core import losses as L
from moeparadigms.core import routing as R

from .test_layer import EXPERTS, ROUTERS, D, _check_against_reference, _task

STACKED = ["mlp-gelu-bias", "mlp-relu", "swiglu"]
NO_GRAD = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def _moe(router: str, experts: str, dense, **kw) -> MoE:
    torch.manual_seed(0)
    return MoE(router=ROUTERS[router](), experts=EXPERTS[experts](), dense_dispatch=dense, **kw).eval()


def _x_task(moe: MoE):
    torch.manual_seed(1)
    return torch.randn(2, 5, D), _task(moe.router)


@pytest.mark.parametrize("mode", list(NO_GRAD))
@pytest.mark.parametrize("dense", [False, True], ids=["sorted", "dense"])
@pytest.mark.parametrize("experts", ["mlp-gelu-bias", "swiglu", "modules"])
@pytest.mark.parametrize("router", list(ROUTERS))
def test_inference_output_and_stats_equal_the_full_path(router, experts, dense, mode):
    moe = _moe(router, experts, dense)
    x, task = _x_task(moe)
    full = moe(x, task_id=task)
    with NO_GRAD[mode]():
        fast = moe(x, task_id=task)
    assert torch.equal(fast.y, full.y.detach())
    assert fast.losses == {} and fast.aux_loss.shape == () and float(fast.aux_loss) == 0.0
    assert fast.stats is not None  # kept by default: validation loops log them
    for name, a, b in zip(full.stats._fields, full.stats, fast.stats):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("dense", [False, True], ids=["sorted", "dense"])
@pytest.mark.parametrize("router", ["topk2", "switch", "noisy-eval", "bias-balanced", "expert-choice", "soft"])
def test_aux_in_inference_gives_the_training_losses(router, dense):
    moe = _moe(router, "mlp-gelu-bias", dense, aux_in_inference=True)
    x, task = _x_task(moe)
    full = moe(x, task_id=task)
    with torch.no_grad():
        fast = moe(x, task_id=task)
    assert full.losses.keys() == fast.losses.keys() and fast.losses
    for k in full.losses:
        torch.testing.assert_close(full.losses[k].detach(), fast.losses[k], rtol=0, atol=0)
    torch.testing.assert_close(full.aux_loss.detach(), fast.aux_loss, rtol=0, atol=0)


@pytest.mark.parametrize("dense", [False, True], ids=["sorted", "dense"])
@pytest.mark.parametrize("router", ["topk1", "topk2", "switch", "bias-balanced", "hash", "task-concat", "expert-choice", "soft"])
def test_no_loss_stat_or_check_work_in_inference(router, dense, monkeypatch):
    """With stats_in_inference=False nothing but the routing and the experts runs: the loss functions and the
    finite check would raise, and the profiler sees no counting, logsumexp, entropy or isfinite op."""
    moe = _moe(router, "mlp-gelu-bias", dense, stats_in_inference=False)
    x, task = _x_task(moe)
    ref = moe(x, task_id=task).y.detach()

    def boom(*a, **k):
        raise AssertionError("auxiliary/statistics work in inference")

    for name in ("switch_load_balance_loss", "router_z_loss", "importance_loss", "load_loss"):
        monkeypatch.setattr(L, name, boom)
    monkeypatch.setattr(R, "_check_finite_logits", boom)
    monkeypatch.setattr(MoE, "_entropy", staticmethod(boom))
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        out = moe(x, task_id=task)
    assert torch.equal(out.y, ref) and out.stats is None and out.losses == {}
    ops = {e.key for e in prof.key_averages()}
    banned = {"aten::bincount", "aten::logsumexp", "aten::special_entr", "aten::isfinite", "aten::item",
              "aten::_local_scalar_dense", "aten::nonzero"}
    if router in ("bias-balanced",) or (not dense and router != "soft"):
        banned -= {"aten::bincount"}  # the sorted dispatch counts rows per expert to slice them
    if (not dense and router != "soft") or router == "task-concat":
        # the sorted dispatch reads its per-expert row counts on the host; task ids are range-checked
        banned -= {"aten::item", "aten::_local_scalar_dense"}
    assert not ops & banned, ops & banned


def test_inference_skips_the_finite_check_and_the_nan_stays_in_its_row():
    moe = _moe("topk2", "mlp-gelu-bias", True)
    x = torch.randn(6, D)
    x[2, 3] = float("nan")
    with pytest.raises(FloatingPointError):
        moe(x)  # autograd on: checked
    with torch.no_grad():
        y = moe(x).y  # no host sync, no error
    bad = ~torch.isfinite(y).all(-1)
    assert bad.tolist() == [False, False, True, False, False, False]


def test_stats_in_inference_false_only_in_inference():
    moe = _moe("topk2", "swiglu", True, stats_in_inference=False)
    x = torch.randn(4, D)
    assert moe(x).stats is not None and moe(x).losses  # training/grad path: always computed
    with torch.no_grad():
        assert moe(x).stats is None


@pytest.mark.parametrize("experts", STACKED)
@pytest.mark.parametrize("router", [r for r in ROUTERS if r != "soft"])
@pytest.mark.parametrize("tokens", [1, 3, 7, 17, 40], ids=lambda t: f"T{t}")
def test_fused_dense_path_both_branches_match_reference(router, experts, tokens):
    """forward_dense takes a batched matmul up to T = 2D tokens and the side-by-side GEMM above (D = 8 here)."""
    torch.manual_seed(2)
    r = ROUTERS[router]()
    moe = MoE(router=r, experts=EXPERTS[experts](), dense_dispatch=True)
    task = torch.randint(0, 3, (tokens,)) if isinstance(r, TaskConditionedRouter) else None
    _check_against_reference(moe, torch.randn(tokens, D), task=task)


@pytest.mark.parametrize("experts", STACKED)
@pytest.mark.parametrize("tokens", [3, 20])
def test_fused_dense_path_is_twice_differentiable(experts, tokens):
    """Plain autograd ops: the gradient of a gradient (second-order MAML) matches the per-token reference."""
    from .reference import moe_ref

    torch.manual_seed(3)
    moe = MoE(router=ROUTERS["topk2"](), experts=EXPERTS[experts](), dense_dispatch=True).double()
    x = torch.randn(tokens, D, dtype=torch.float64, requires_grad=True)
    params = list(moe.experts.parameters())
    outs = []
    for f in (lambda: moe(x).y, lambda: moe_ref(moe, x)):
        g = torch.autograd.grad(f().square().sum(), params, create_graph=True)
        outs.append(torch.autograd.grad(sum(t.square().sum() for t in g), x))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-9, atol=1e-10)


def test_soft_router_inference_skips_z_loss():
    moe = _moe("soft", "mlp-relu", False, stats_in_inference=False)
    assert isinstance(moe.router, SoftMoERouter)
    x = torch.randn(2, 5, D)
    full = moe(x)
    with torch.no_grad():
        out = moe(x)
    assert out.losses == {} and out.stats is None and torch.equal(out.y, full.y.detach())


@pytest.mark.parametrize("router", ["topk2", "noisy-eval", "task-concat"])
def test_topk_weights_from_the_chosen_logits_equal_renormalised_probabilities(router):
    """Renormalising routers take softmax over the k chosen logits: the same experts and weights as the
    top-k of softmax(logits) renormalised; probs_TE is that softmax, computed when first read."""
    torch.manual_seed(4)
    r = ROUTERS[router]().double().train(router == "noisy-eval")
    x = torch.randn(50, D, dtype=torch.float64)
    task = torch.randint(0, 3, (50,)) if isinstance(r, TaskConditionedRouter) else None
    out = r(x, task_id_T=task)
    assert out.__dict__["_probs_TE"] is None  # not computed yet
    probs = torch.softmax(out.logits_TE, -1)
    w, ids = torch.topk(probs, r.top_k, dim=-1)
    assert torch.equal(out.ids_TK, ids)
    torch.testing.assert_close(out.weights_TK, w / w.sum(-1, keepdim=True), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.probs_TE, probs, rtol=0, atol=0)
    assert torch.equal(out.token_A, torch.arange(50).repeat_interleave(r.top_k))
    assert torch.equal(out.expert_A, ids.reshape(-1)) and torch.equal(out.weight_A, out.weights_TK.reshape(-1))


def test_finite_check_is_exact_when_finite_logits_overflow_their_sum():
    """The check sums the logits first (one reduction); finite logits whose sum overflows are not an error."""
    big = torch.full((4, 3), 3e38)
    R._check_finite_logits(big)  # the sum is inf, every element finite: no error
    big[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="contain 1 non-finite"):
        R._check_finite_logits(big)
    with pytest.raises(FloatingPointError, match="contain 2 non-finite"):
        R._check_finite_logits(torch.tensor([[1.0, float("inf"), -float("inf")]]))
