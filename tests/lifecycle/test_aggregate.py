"""Post-hoc aggregation (Honda et al. 2024): the combination rules against hand-computed values, the router loss
against a plain loop, per-expert predictions of an MoEMLP, and that aggregation needs no retraining."""
from __future__ import annotations

import pytest
import torch

from moeparadigms.core import MLPExperts, MoE, TopKRouter
from moeparadigms.lifecycle import PredictionMoE, aggregate, forced_expert_logits, router_diversity_loss
from moeparadigms.nets import MoEMLP


def test_combination_rules_by_hand():
    # two experts, one sample, three classes
    p = torch.tensor([[[0.7, 0.2, 0.1]], [[0.1, 0.5, 0.4]]])
    r = torch.tensor([[0.9, 0.1]])
    assert torch.allclose(aggregate(p, "router", r), torch.tensor([[0.64, 0.23, 0.13]]))
    assert torch.allclose(aggregate(p, "uniform"), torch.tensor([[0.4, 0.35, 0.25]]))
    assert torch.allclose(aggregate(p, "pessimistic"), torch.tensor([[0.1, 0.2, 0.1]]))
    # the router follows expert 0 (class 0); pessimism picks the class no expert rules out (class 1)
    assert aggregate(p, "router", r).argmax().item() == 0 and aggregate(p, "pessimistic").argmax().item() == 1


def test_pessimistic_is_the_worst_case_mixture_over_the_simplex():
    torch.manual_seed(0)
    p = torch.rand(4, 3, 5).softmax(-1)
    pess = aggregate(p, "pessimistic")
    for _ in range(200):  # no mixture weights give a class less than the minimum, and the vertices attain it
        w = torch.rand(3, 4).softmax(-1)
        assert (aggregate(p, "router", w) >= pess - 1e-7).all()
    vertices = torch.stack([aggregate(p, "router", torch.eye(4)[k].expand(3, 4)) for k in range(4)])
    assert torch.allclose(vertices.min(0).values, pess)


def test_router_diversity_loss_matches_a_plain_loop():
    torch.manual_seed(1)
    r = torch.rand(6, 4).softmax(-1)
    for k in (0, 2):
        total, n_off = 0.0, 0
        for i in range(6):
            sims = [(float(r[i] @ r[j]) if i != j else 0.0) for j in range(6)]
            kth = sorted(sims, reverse=True)[k - 1] if k else None
            for j in range(6):
                if i != j:
                    n_off += 1
                    if kth is None or sims[j] >= kth:
                        total += sims[j] ** 2
        assert torch.allclose(router_diversity_loss(r, k), torch.tensor(total ** 0.5 / n_off ** 0.5), atol=1e-6)
    # identical routings are penalised more than disjoint one-hot routings
    same = torch.tensor([[1.0, 0.0]] * 4)
    diff = torch.tensor([[1.0, 0.0], [0.0, 1.0]] * 2)
    assert router_diversity_loss(same) > router_diversity_loss(diff)


def test_prediction_moe_experts_match_a_per_expert_reference_and_training_lowers_the_loss():
    torch.manual_seed(2)
    m = PredictionMoE(in_features=5, num_classes=3, num_experts=3, d_model=8, hidden=16)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    probs, router = m(x)
    h = m.embed(x)
    for e in range(3):
        a = torch.nn.functional.gelu(h @ m.experts.w1.row(e)) @ m.experts.w2.row(e)
        ref = (m.norm(h + a) @ m.head_w[e] + m.head_b[e]).softmax(-1)
        assert torch.allclose(probs[e], ref, atol=1e-5)
    assert torch.allclose(router, (h @ m.router.gate.full().t()).softmax(-1), atol=1e-6)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = m.loss(x, y).item()
    for _ in range(50):
        loss = m.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert m.loss(x, y).item() < 0.5 * first
    with pytest.raises(ValueError, match="how"):
        m.predict(x, "vote")


def test_forced_expert_logits_equal_a_single_expert_network():
    torch.manual_seed(3)
    moe = MoE(router=TopKRouter(d_model=8, num_experts=4, top_k=2), experts=MLPExperts(d_model=8, hidden=16, num_experts=4))
    net = MoEMLP(in_features=6, out_features=3, moe=moe)
    x = torch.randn(10, 6)
    before = net(x).y
    out = forced_expert_logits(net, x)
    assert out.shape == (4, 10, 3)
    for e in range(4):
        h = net.inp(x)
        z = net.blocks[0].norm(h)
        a = torch.nn.functional.gelu(z @ moe.experts.w1.row(e)) @ moe.experts.w2.row(e)
        assert torch.allclose(out[e], net.head(net.norm(h + a)), atol=1e-5)
    assert torch.equal(net(x).y, before)  # the network is restored
