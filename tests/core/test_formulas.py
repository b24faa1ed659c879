"""Routers and losses against their papers' formulas on tiny hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moeparadigms.core import (
    BiasBalancedRouter,
    ExpertChoiceRouter,
    MLPExperts,
    ModuleExperts,
    MoE,
    SoftMoERouter,
    TopKRouter,
    update_router_biases,
)
from moeparadigms.core import losses as L
from moeparadigms.core.routing import _load_probabilities


def _set_gate(router, W):
    with torch.no_grad():
        router.gate.blocks[0].copy_(torch.as_tensor(W, dtype=torch.float64))


def _identity_bank(E, D):
    return ModuleExperts(d_model=D, experts=[nn.Identity() for _ in range(E)])


def test_expert_choice_hand_computed():
    # 4 tokens, 2 experts, capacity_factor 1 -> each expert picks C = 4 * 1 / 2 = 2 tokens
    router = ExpertChoiceRouter(d_model=2, num_experts=2, capacity_factor=1.0).double()
    _set_gate(router, [[1.0, 0.0], [0.0, 1.0]])  # logit_e = x_e
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    S = torch.softmax(x, dim=-1)  # affinities (T, E)
    # expert 0 takes the two largest S[:, 0]: tokens 0 (0.88) and 2 (0.5); expert 1 takes tokens 3 and 1
    r = router(x)
    assert r.expert_A.tolist() == [0, 0, 1, 1]
    assert r.token_A.tolist() == [0, 2, 3, 1]
    torch.testing.assert_close(r.weight_A, torch.stack([S[0, 0], S[2, 0], S[3, 1], S[1, 1]]))
    # with identity experts, y_t = sum of the weights of the experts that chose t, times x_t
    moe = MoE(router=router, experts=_identity_bank(2, 2))
    y = moe(x).y
    expected = torch.stack([S[0, 0] * x[0], S[1, 1] * x[1], S[2, 0] * x[2], S[3, 1] * x[3]])
    torch.testing.assert_close(y, expected)


def test_soft_moe_hand_computed():
    # one group of N=2 tokens, E=2 experts x 1 slot, identity experts: y = C (D^T X)
    router = SoftMoERouter(d_model=2, num_experts=2, slots_per_expert=1).double()
    with torch.no_grad():
        router.phi.blocks[0].copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]]))
    X = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # X @ Phi
    Dm = torch.exp(logits) / torch.exp(logits).sum(0, keepdim=True)  # softmax over tokens (columns)
    Cm = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)  # softmax over slots (rows)
    expected = Cm @ (Dm.t() @ X)
    y = MoE(router=router, experts=_identity_bank(2, 2))(X).y
    torch.testing.assert_close(y, expected)
    # hand numbers for the first slot: token weights e/(e+1), 1/(e+1)
    e = math.e
    torch.testing.assert_close(Dm[:, 0], torch.tensor([e / (e + 1), 1 / (e + 1)], dtype=torch.float64))


def test_soft_moe_groups_do_not_mix():
    router = SoftMoERouter(d_model=4, num_experts=2, slots_per_expert=2)
    moe = MoE(router=router, experts=MLPExperts(d_model=4, hidden=8, num_experts=2))
    x = torch.randn(3, 5, 4)
    y = moe(x).y
    x2 = x.clone()
    x2[1] += 10.0  # change only group 1
    y2 = moe(x2).y
    torch.testing.assert_close(y[0], y2[0])
    torch.testing.assert_close(y[2], y2[2])
    assert not torch.allclose(y[1], y2[1])


def test_topk_weights_formula():
    router = TopKRouter(d_model=2, num_experts=3, top_k=2, temperature=2.0).double()
    _set_gate(router, [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    logits = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / 2.0
    p = torch.softmax(logits, -1)
    r = router(x)
    assert r.expert_A.tolist() == [2, 1]
    torch.testing.assert_close(r.weight_A, torch.stack([p[2], p[1]]) / (p[2] + p[1]))


def test_switch_load_balance_loss_formula():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
    expert = torch.tensor([0, 1, 0, 2])  # top-1 choices
    f = torch.tensor([2 / 4, 1 / 4, 1 / 4])
    P = probs.mean(0)
    expected = 3 * (f * P).sum()
    torch.testing.assert_close(L.switch_load_balance_loss(probs, expert, 3), expected)
    # uniform routing gives exactly 1
    uni = torch.full((6, 3), 1 / 3)
    torch.testing.assert_close(L.switch_load_balance_loss(uni, torch.tensor([0, 1, 2, 0, 1, 2]), 3), torch.tensor(1.0))


def test_z_loss_formula():
    logits = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    expected = ((math.log(math.e + math.e**2)) ** 2 + (math.log(1 + math.exp(-1))) ** 2) / 2
    torch.testing.assert_close(L.router_z_loss(logits), torch.tensor(expected))


def test_importance_and_load_losses_are_cv_squared():
    gates = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    imp = torch.tensor([1.5, 0.5, 0.0])
    expected = imp.var(unbiased=False) / imp.mean() ** 2
    torch.testing.assert_close(L.importance_loss(gates), expected)
    torch.testing.assert_close(L.load_loss(gates), expected)
    assert float(L.cv_squared(torch.tensor([2.0, 2.0, 2.0]))) == 0.0


def test_noisy_topk_load_probability_matches_monte_carlo():
    # P(expert i in top-k | others' noise fixed) = Phi((clean_i - threshold) / std_i), Shazeer eq. 9
    torch.manual_seed(0)
    clean = torch.tensor([[0.3, 0.1, -0.2, 0.0]], dtype=torch.float64)
    std = torch.tensor([[0.5, 0.4, 0.3, 0.6]], dtype=torch.float64)
    noisy = clean + torch.randn_like(clean) * std
    k = 2
    P = _load_probabilities(clean, noisy, std, k)[0]
    n = 200_000
    for i in range(4):
        trials = noisy.repeat(n, 1)
        trials[:, i] = clean[0, i] + torch.randn(n, dtype=torch.float64) * std[0, i]
        in_topk = (torch.topk(trials, k, dim=-1).indices == i).any(-1).double().mean()
        assert abs(float(in_topk) - float(P[i])) < 0.005, (i, float(in_topk), float(P[i]))


def test_noisy_gating_loss_reaches_router_and_noise_only_in_training():
    moe = MoE(
        router=TopKRouter(d_model=4, num_experts=4, top_k=1, noisy=True),
        experts=MLPExperts(d_model=4, hidden=4, num_experts=4), load_coef=1.0, importance_coef=1.0,
    )
    x = torch.randn(32, 4)
    out = moe(x)
    assert {"load", "importance", "load_balance", "z_loss"} <= set(out.losses)
    out.aux_loss.backward()
    assert moe.router.noise.blocks[0].grad is not None and moe.router.noise.blocks[0].grad.abs().sum() > 0
    moe.eval()
    torch.testing.assert_close(moe(x).y, moe(x).y)  # deterministic in eval


def test_bias_balanced_router_balances_load_without_changing_weights():
    torch.manual_seed(0)
    router = BiasBalancedRouter(d_model=8, num_experts=4, top_k=1, bias_update_rate=0.01)
    with torch.no_grad():
        router.gate.blocks[0][0] += 2.0  # expert 0 attracts most tokens at the start
    x = torch.randn(512, 8) + 0.5
    first = torch.bincount(router(x).expert_A, minlength=4).float()
    update_router_biases(router)  # once per optimizer step; here one forward per step
    for _ in range(300):
        router(x)
        update_router_biases(router)
    last = torch.bincount(router(x).expert_A, minlength=4).float()
    cv = lambda c: float(c.std(unbiased=False) / c.mean())  # noqa: E731
    assert cv(last) < 0.5 * cv(first), (first.tolist(), last.tolist())
    # the bias picks experts but never enters the weights: weights are normalised sigmoid affinities
    router.eval()
    r = router(x)
    s = torch.sigmoid(x @ router.gate.full().t())
    torch.testing.assert_close(r.weight_A, torch.ones_like(r.weight_A))  # top-1, renormalised
    assert r.probs_TE is not None
    torch.testing.assert_close(r.probs_TE, s / s.sum(-1, keepdim=True))


@pytest.mark.parametrize("k", [1, 2])
def test_load_balance_fraction_counts_each_of_k_choices(k):
    moe = MoE(router=TopKRouter(d_model=4, num_experts=4, top_k=k), experts=MLPExperts(d_model=4, hidden=4, num_experts=4))
    out = moe(torch.randn(20, 4))
    assert int(out.stats.tokens_per_expert.sum()) == 20 * k
