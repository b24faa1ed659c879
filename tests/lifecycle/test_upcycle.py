"""Sparse upcycling and drop-upcycling: step-0 equality with the dense block, what gets converted, drop statistics."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moeparadigms.core import FFN, MLPExperts, MoE, TopKRouter
from moeparadigms.lifecycle import UpcycledFFN, aux_loss, upcycle
from moeparadigms.nets import MoEMLP


def dense_mlp(depth: int = 2, hidden: int = 48, bias: bool = False) -> MoEMLP:
    moe = MoE(router=TopKRouter(d_model=24, num_experts=1, top_k=1),
              experts=MLPExperts(d_model=24, hidden=hidden, num_experts=1, bias=bias))
    return MoEMLP(in_features=10, out_features=5, moe=moe, depth=depth)


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("bias", [False, True])
def test_copy_upcycled_trunk_equals_dense_at_step0(top_k, bias):
    torch.manual_seed(1)
    net = dense_mlp(bias=bias)
    x = torch.randn(300, 10)
    ref = net(x).y
    up, report = upcycle(copy.deepcopy(net), num_experts=8, top_k=top_k, seed=0)
    assert report.converted == ["blocks.0.moe", "blocks.1.moe"]
    assert [m.num_experts for m in up.moe_layers()] == [8, 8]
    assert all(m.router.top_k == top_k and m.router.renormalize for m in up.moe_layers())
    out = up(x)
    assert (out.y - ref).abs().max().item() <= 1e-6
    # the routing really is spread over several experts, so equality is not a single-expert accident
    assert (out.stats[0].tokens_per_expert > 0).sum() >= min(8, 2 * top_k)


@pytest.mark.parametrize("block", ["sequential-gelu", "sequential-relu-bias", "ffn", "ffn-glu"])
def test_dense_blocks_upcycle_to_equal_output(block):
    torch.manual_seed(2)
    dense = {
        "sequential-gelu": lambda: nn.Sequential(nn.Linear(16, 40, bias=False), nn.GELU(), nn.Linear(40, 16, bias=False)),
        "sequential-relu-bias": lambda: nn.Sequential(nn.Linear(16, 40), nn.ReLU(), nn.Linear(40, 16)),
        "ffn": lambda: FFN(d_model=16, hidden=40),
        "ffn-glu": lambda: FFN(d_model=16, hidden=40, glu=True, activation="silu", bias=True),
    }[block]()
    x = torch.randn(64, 16)
    ref = dense(x)
    up, report = upcycle(dense, num_experts=4, top_k=2, seed=0)
    assert isinstance(up, UpcycledFFN) and report.converted == [""]
    assert (up(x) - ref).abs().max().item() <= 1e-6
    assert up.last_output is not None and aux_loss(up) > 0  # load balance + z-loss come back


def test_nested_blocks_are_replaced_in_place_and_others_skipped():
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Linear(8, 16),
        nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 16)),  # D -> H -> D: converted
        nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)),  # unsupported activation
        nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),  # D -> D': not an MoE layer
    )
    x = torch.randn(20, 8)
    ref = model(x)
    same, report = upcycle(model, num_experts=4, top_k=2, seed=0)
    assert same is model
    assert report.converted == ["1"]
    assert isinstance(model[1], UpcycledFFN) and isinstance(model[2], nn.Sequential)
    assert len(report.skipped) == 2 and "Tanh" in report.skipped[0] and "16 -> 4" in report.skipped[1]
    assert (model(x) - ref).abs().max().item() <= 1e-6


def test_drop_upcycling_redraws_the_given_fraction_per_expert_from_the_weight_statistics():
    torch.manual_seed(4)
    net = dense_mlp(depth=1, hidden=200)
    w1 = net.blocks[0].moe.experts.w1.row(0).detach().clone()  # (D, H)
    w2 = net.blocks[0].moe.experts.w2.row(0).detach().clone()  # (H, D)
    up, _ = upcycle(net, num_experts=6, top_k=2, init="drop", drop_ratio=0.25, seed=0)
    bank = up.blocks[0].moe.experts
    changed_sets = []
    for e in range(6):
        changed = (bank.w1.row(e).detach() != w1).any(0)  # hidden units whose W1 column changed
        changed_w2 = (bank.w2.row(e).detach() != w2).any(1)
        assert torch.equal(changed, changed_w2)  # the same units in W1 and W2
        assert int(changed.sum()) == 50
        changed_sets.append(changed)
        new_cols = bank.w1.row(e).detach()[:, changed]
        # drawn from N(mean, std) of the dense W1 (a uniform init: std = bound / sqrt(3))
        assert abs(new_cols.mean().item() - w1.mean().item()) < 0.02
        assert abs(new_cols.std().item() / w1.std().item() - 1) < 0.1
    assert not all(torch.equal(changed_sets[0], c) for c in changed_sets[1:])  # each expert draws its own units


def test_drop_upcycling_is_deterministic_under_a_seed_and_differs_across_seeds():
    torch.manual_seed(5)
    net = dense_mlp(depth=1)
    a, _ = upcycle(copy.deepcopy(net), num_experts=4, init="drop", seed=3)
    b, _ = upcycle(copy.deepcopy(net), num_experts=4, init="drop", seed=3)
    c, _ = upcycle(copy.deepcopy(net), num_experts=4, init="drop", seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_upcycled_model_trains_and_its_state_dict_loads_into_a_fresh_model_of_that_size():
    torch.manual_seed(6)
    up, _ = upcycle(dense_mlp(), num_experts=4, top_k=2, seed=0)
    opt = torch.optim.AdamW(up.parameters(), lr=1e-2)
    x, y = torch.randn(64, 10), torch.randint(0, 5, (64,))
    for _ in range(5):
        out = up(x)
        loss = nn.functional.cross_entropy(out.y, y) + out.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = up.blocks[0].moe.experts.w1.full().detach()
    assert not torch.allclose(w[0], w[1])  # experts drift apart once trained
    fresh = MoEMLP(in_features=10, out_features=5, depth=2,
                   moe=MoE(router=TopKRouter(d_model=24, num_experts=4, top_k=2, renormalize=True),
                           experts=MLPExperts(d_model=24, hidden=48, num_experts=4)))
    fresh.load_state_dict(up.state_dict())
    assert torch.equal(fresh(x).y, up(x).y)


@pytest.mark.parametrize("kwargs, field", [
    (dict(num_experts=1), "num_experts"), (dict(num_experts=4, top_k=5), "top_k"),
    (dict(num_experts=4, init="mean"), "init"), (dict(num_experts=4, drop_ratio=1.5), "drop_ratio"),
])
def test_bad_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        upcycle(dense_mlp(), **kwargs)


def test_a_built_ppo_actor_critic_with_one_expert_upcycles_exactly():
    pytest.importorskip("gymnasium")
    from moeparadigms.paradigms.rl import PPO

    torch.manual_seed(7)
    moe = MoE(router=TopKRouter(d_model=32, num_experts=1, top_k=1), experts=MLPExperts(d_model=32, hidden=32, num_experts=1))
    ppo = PPO(network="moe", hidden=32, moe=moe)
    ppo.build(4, {"kind": "discrete", "n": 2})
    x = torch.randn(16, 4)
    ref = ppo.actor(x)[0], ppo.critic(x)[0]
    _, report = upcycle(ppo, num_experts=4, top_k=2, seed=0)
    assert report.converted == ["actor.trunk.blocks.0.moe", "critic.trunk.blocks.0.moe"]
    assert (ppo.actor(x)[0] - ref[0]).abs().max() <= 1e-6 and (ppo.critic(x)[0] - ref[1]).abs().max() <= 1e-6


def test_a_block_registered_under_two_names_is_upcycled_once():
    """A module holding the same single-expert MoE as ``self.moe`` and inside ``self.trunk`` (the continual
    paradigm does) gets one upcycled layer under both names, reported once."""
    from moeparadigms.core import MLPExperts, MoE, TopKRouter
    from moeparadigms.lifecycle import upcycle

    moe = MoE(router=TopKRouter(d_model=8, num_experts=1, top_k=1), experts=MLPExperts(d_model=8, hidden=16, num_experts=1))
    holder = torch.nn.Module()
    holder.moe, holder.block = moe, torch.nn.Sequential(moe)
    _, report = upcycle(holder, num_experts=4, top_k=2, seed=0)
    assert report.converted == ["moe"]
    assert holder.block[0] is holder.moe and holder.moe.num_experts == 4
