"""Zero tokens: an empty output of the input's shape, zero auxiliary losses and finite (zero) gradients, for every
router x expert bank x dispatch path (issue 12: NaN aux losses, Soft MoE crashing on ``(0, d)``)."""
from __future__ import annotations

import pytest
import torch

from moeparadigms.core import MoE, TaskConditionedRouter, update_router_biases

from .test_layer import EXPERTS, ROUTERS


@pytest.mark.parametrize("shape", [(0, 8), (2, 0, 8), (0, 5, 8)], ids=["0xD", "Bx0xD", "0xNxD"])
@pytest.mark.parametrize("dense", [False, True], ids=["sorted", "dense"])
@pytest.mark.parametrize("experts", list(EXPERTS))
@pytest.mark.parametrize("router", list(ROUTERS))
def test_zero_tokens(router, experts, dense, shape):
    torch.manual_seed(0)
    moe = MoE(router=ROUTERS[router](), experts=EXPERTS[experts](), dense_dispatch=dense, importance_coef=0.1)
    x = torch.randn(*shape, requires_grad=True)
    task = torch.zeros(shape[:-1], dtype=torch.long) if isinstance(moe.router, TaskConditionedRouter) else None
    out = moe(x, task_id=task)
    assert out.y.shape == x.shape
    assert float(out.aux_loss.detach()) == 0.0
    for name, v in out.losses.items():
        assert float(v.detach()) == 0.0, name
    assert int(out.stats.num_tokens) == 0
    if router != "soft":  # Soft MoE's slots exist whatever the token count (they are all zero here)
        assert int(out.stats.tokens_per_expert.sum()) == 0
    # the empty output stays in the graph: a training step on an empty batch runs and changes nothing
    (out.y.sum() + out.aux_loss).backward()
    assert x.grad is not None and x.grad.shape == x.shape
    grads = {n: p.grad for n, p in moe.named_parameters() if p.grad is not None}
    for n, g in grads.items():
        assert torch.equal(g, torch.zeros_like(g)), n


def test_zero_tokens_training_mode_bias_balanced_keeps_bias():
    moe = MoE(router=ROUTERS["bias-balanced"](), experts=EXPERTS["mlp-relu"]()).train()
    before = moe.router.expert_bias.clone()
    out = moe(torch.randn(0, 8))
    update_router_biases(moe)
    assert float(out.aux_loss) == 0.0 and torch.equal(moe.router.expert_bias, before)
