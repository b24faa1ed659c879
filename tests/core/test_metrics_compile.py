from __future__ import annotations

import math

import pytest
import torch

from moeparadigms.core import MLPExperts, MoE, RoutingMetrics, TopKRouter
from moeparadigms.core.layer import RoutingStats


def _stats(counts, dropped=0, entropy=0.0, tokens=1):
    counts = torch.tensor(counts)
    return RoutingStats(counts, torch.tensor(dropped), torch.tensor(int(counts.sum()) + dropped), torch.tensor(entropy), torch.tensor(tokens))


def test_routing_metrics_hand_computed():
    m = RoutingMetrics(num_experts=4)
    m.update(_stats([3, 1, 0, 0], dropped=2, entropy=2.0, tokens=2))
    m.update(_stats([1, 1, 0, 2], dropped=0, entropy=1.0, tokens=2))
    out = m.compute()
    torch.testing.assert_close(out["tokens_per_expert"], torch.tensor([0.5, 0.25, 0.0, 0.25]))
    torch.testing.assert_close(out["dropped_fraction"], torch.tensor(2 / 10))
    torch.testing.assert_close(out["router_entropy"], torch.tensor(3.0 / 4))
    torch.testing.assert_close(out["normalized_entropy"], torch.tensor(0.75 / math.log(4)))
    torch.testing.assert_close(out["utilization"], torch.tensor(0.75))
    torch.testing.assert_close(out["max_load"], torch.tensor(2.0))


def test_routing_metrics_follow_growth_and_real_layer():
    moe = MoE(router=TopKRouter(d_model=8, num_experts=2, top_k=1), experts=MLPExperts(d_model=8, hidden=4, num_experts=2))
    m = RoutingMetrics(num_experts=2)
    m.update(moe(torch.randn(10, 8)).stats)
    moe.add_experts(1)
    m.update(moe(torch.randn(10, 8)).stats)
    out = m.compute()
    assert out["tokens_per_expert"].numel() == 3
    torch.testing.assert_close(out["tokens_per_expert"].sum(), torch.tensor(1.0))
    assert 0 < float(out["router_entropy"]) <= math.log(3)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_matches_eager(backend):
    torch.manual_seed(0)
    moe = MoE(router=TopKRouter(d_model=16, num_experts=4, top_k=2), experts=MLPExperts(d_model=16, hidden=32, num_experts=4))
    x = torch.randn(32, 16, requires_grad=True)
    compiled = torch.compile(moe, backend=backend)
    y_eager = moe(x).y
    (g_eager,) = torch.autograd.grad(y_eager.sum(), x)
    y_c = compiled(x).y
    (g_c,) = torch.autograd.grad(y_c.sum(), x)
    torch.testing.assert_close(y_c, y_eager)
    torch.testing.assert_close(g_c, g_eager)
