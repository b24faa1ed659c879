"""The fused small-batch training step (core/fused.py) against the per-token reference: outputs, losses,
statistics and every gradient (input, router, experts), both expert variants; where it applies and where not."""
from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from moeparadigms.core import MLPExperts, MoE, SwitchRouter, TopKRouter, fused
from moeparadigms.core import losses as L

from .reference import moe_ref


def _moe(E=4, K=2, H=16, D=8, act="gelu", temperature=1.0, renormalize=None, **kw):
    torch.manual_seed(0)
    return MoE(router=TopKRouter(d_model=D, num_experts=E, top_k=K, temperature=temperature, renormalize=renormalize),
               experts=MLPExperts(d_model=D, hidden=H, num_experts=E, activation=act), **kw)


def _grads(moe, x, loss_fn):
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    loss_fn(x).backward()
    return x.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}


@pytest.fixture
def calls(monkeypatch):
    """How often the layer took the fused step."""
    n = [0]
    inner = fused.topk_moe

    def counted(*a):
        n[0] += 1
        return inner(*a)

    monkeypatch.setattr(fused, "topk_moe", counted)
    return n


@pytest.mark.parametrize("variant", ["all", "sorted"])
@pytest.mark.parametrize("E,K,act,temperature,renormalize", [(4, 2, "gelu", 1.0, None), (8, 3, "silu", 0.7, None),
                                                             (4, 2, "relu", 1.0, None), (4, 1, "gelu", 1.0, None),
                                                             (8, 2, "gelu", 1.3, False)])
def test_matches_reference(monkeypatch, calls, variant, E, K, act, temperature, renormalize):
    monkeypatch.setattr(fused, "SORTED_FROM", 0 if variant == "sorted" else 10**9)
    moe = _moe(E=E, K=K, act=act, temperature=temperature, renormalize=renormalize)
    with torch.no_grad():  # expert 0 gets no token: its gradient must be exactly zero, not garbage
        moe.router.gate.block0[0] = -5.0 * moe.router.gate.block0[1:].abs().sum(0)
    T = 24
    x = torch.randn(T, 8).abs() + 0.1  # >= 0: expert 0's logit is below every other
    g = torch.randn(T, 8)

    def fast(x):
        out = moe(x)
        return (out.y * g).sum() + 3 * out.losses["load_balance"] + 5 * out.losses["z_loss"]

    def ref(x):
        r = moe.router(x)
        lb = L.switch_load_balance_loss(r.probs_TE, r.expert_A, E)
        return (moe_ref(moe, x) * g).sum() + 3 * lb + 5 * L.router_z_loss(r.logits_TE)

    out = moe(x.requires_grad_())
    assert calls[0] == 1
    r = moe.router(x)
    torch.testing.assert_close(out.y, moe_ref(moe, x))
    torch.testing.assert_close(out.losses["load_balance"], L.switch_load_balance_loss(r.probs_TE, r.expert_A, E))
    torch.testing.assert_close(out.losses["z_loss"], L.router_z_loss(r.logits_TE))
    torch.testing.assert_close(out.aux_loss, moe.weighted_aux_loss(out.losses))
    assert out.stats.tokens_per_expert.tolist() == torch.bincount(r.expert_A, minlength=E).tolist()
    assert out.stats.tokens_per_expert[0] == 0
    assert int(out.stats.assigned) == T * K and int(out.stats.num_tokens) == T and int(out.stats.dropped) == 0
    torch.testing.assert_close(out.stats.entropy_sum, torch.special.entr(r.probs_TE).sum())
    dx, dp = _grads(moe, x.detach(), fast)
    rdx, rdp = _grads(moe, x.detach(), ref)
    torch.testing.assert_close(dx, rdx)
    assert dp.keys() == rdp.keys()
    for name in dp:
        torch.testing.assert_close(dp[name], rdp[name], msg=name)
    assert dp["experts.w1.block0"][0].abs().sum() == 0 and dp["experts.w2.block0"][0].abs().sum() == 0


def test_taken_only_where_supported(calls):
    x = torch.randn(10, 8, requires_grad=True)
    moe = _moe()
    moe(x)
    assert calls[0] == 1
    with torch.no_grad():
        moe(x)  # inference: the layer's own inference path
    for other in (_moe(dense_dispatch=True), _moe(dense_dispatch=False), _moe(capacity_factor=2.0),
                  _moe(importance_coef=0.1), _moe().double()):
        other(x.double() if next(other.parameters()).dtype == torch.float64 else x)
    switch = MoE(router=SwitchRouter(d_model=8, num_experts=4), experts=MLPExperts(d_model=8, hidden=16, num_experts=4))
    switch(x)
    biased = MoE(router=TopKRouter(d_model=8, num_experts=4), experts=MLPExperts(d_model=8, hidden=16, num_experts=4, bias=True))
    biased(x)
    hooked = _moe()
    handle = hooked.router.register_forward_hook(lambda mod, inp, out: out)  # e.g. lifecycle.expert_dropout
    hooked(x)
    handle.remove()
    hooked(x)
    assert calls[0] == 2  # only once the hook is gone
    big = _moe(D=64, H=64)
    big(torch.randn(600, 64))  # 600 * 2 unrouted pairs * 8,192 multiply-adds, past DENSE_MACS: the sorted path
    assert calls[0] == 2


def test_second_derivative_refused_and_fast_weights_take_plain_autograd(calls):
    moe = _moe()
    x = torch.randn(6, 8, requires_grad=True)
    out = moe(x)
    with pytest.raises(RuntimeError, match="dense_dispatch=True"):  # never a silently wrong second derivative
        torch.autograd.grad(out.y.square().sum(), x, create_graph=True)
    # MAML's fast weights are graph outputs, not leaves: the differentiable dense path, second order works
    n = calls[0]
    fast = {k: p * 1.0 for k, p in moe.named_parameters()}
    y = functional_call(moe, fast, (x,)).y
    (g2,) = torch.autograd.grad(y.square().sum(), fast["experts.w1.block0"], create_graph=True)
    g2.sum().backward()
    assert calls[0] == n and x.grad is not None


def test_non_finite_logits_raise():
    moe = _moe()
    x = torch.randn(5, 8)
    x[2, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        moe(x.requires_grad_())


def test_an_installed_dispatcher_takes_precedence_over_the_fused_step(calls):
    """ExpertParallelMoE installs its all-to-all dispatcher on a layer whose experts are pruned to this rank's: the
    fused step (which runs the layer's own experts) must never replace an installed dispatcher."""
    from moeparadigms.core.dispatchers import SORTED, SortedDispatcher

    used = [0]

    class Spy(SortedDispatcher):
        def __call__(self, *a, **k):
            used[0] += 1
            return SORTED(*a, **k)

    moe, x = _moe(), torch.randn(16, 8)
    assert fused.supports(moe, x)
    moe(x).y.sum().backward()
    assert calls[0] == 1 and used[0] == 0  # by default a small training batch takes the fused step
    moe.dispatcher = Spy()
    moe(x).y.sum().backward()
    assert calls[0] == 1 and used[0] == 1
