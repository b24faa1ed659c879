"""The shared trunk (``moeparadigms.nets.Trunk``): shapes, the per-sample token view, task ids reaching every block,
independent depth copies, the random-number order the paradigms relied on, and old checkpoints' names loading."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moeparadigms.checkpoint import check_compatible
from moeparadigms.core import MLPExperts, MoE, SoftMoERouter, TaskConditionedRouter, TopKRouter
from moeparadigms.core.experts import reinitialize
from moeparadigms.nets import MoEBlock, MoEMLP, Trunk

from ..old_keys import META_MOE, META_SGD_RATES, POLICY_MOE, to_old_names

D = 8


def _moe(E: int = 4, k: int = 2, router: str = "topk") -> MoE:
    r = {"topk": lambda: TopKRouter(d_model=D, num_experts=E, top_k=k),
         "soft": lambda: SoftMoERouter(d_model=D, num_experts=E),
         "task": lambda: TaskConditionedRouter(d_model=D, num_experts=E, top_k=k, num_tasks=3)}[router]()
    return MoE(router=r, experts=MLPExperts(d_model=D, hidden=12, num_experts=E))


@pytest.mark.parametrize("activation", ["identity", "relu", "tanh"])
@pytest.mark.parametrize("final_norm", [True, False])
def test_trunk_shapes_and_math_against_a_hand_loop(activation, final_norm):
    torch.manual_seed(0)
    t = Trunk(in_features=5, moe=_moe(), depth=2, activation=activation, final_norm=final_norm)
    x = torch.randn(7, 5)
    out = t(x)
    assert out.y.shape == (7, D) and out.aux_loss.shape == () and len(out.stats) == 2
    h = {"identity": lambda v: v, "relu": torch.relu, "tanh": torch.tanh}[activation](t.inp(x))
    aux = 0.0
    for b in t.blocks:
        o = b.moe(b.norm(h))
        h, aux = h + o.y, aux + o.aux_loss
    torch.testing.assert_close(out.y, t.norm(h) if final_norm else h, rtol=0, atol=0)
    torch.testing.assert_close(out.aux_loss, aux, rtol=0, atol=0)
    assert (t.norm is not None) == final_norm and t.out_features == D


def test_tokens_view_each_sample_as_its_own_sequence():
    torch.manual_seed(0)
    t = Trunk(in_features=5, moe=_moe(router="soft"), tokens=4, activation="tanh", final_norm=False)
    assert t.inp.out_features == 4 * D and t.out_features == 4 * D
    x = torch.randn(6, 5)
    out = t(x)
    assert out.y.shape == (6, 4 * D)
    b = t.blocks[0]
    ref = b(torch.tanh(t.inp(x)).view(6, 4, D)).y.flatten(-2)
    torch.testing.assert_close(out.y, ref, rtol=0, atol=0)
    x2 = x.clone()
    x2[1:] = torch.randn(5, 5)  # other samples change: sample 0's output does not (Soft MoE mixes within a sequence)
    torch.testing.assert_close(t(x2).y[0], out.y[0], rtol=0, atol=0)


def test_task_ids_reach_every_block():
    torch.manual_seed(0)
    t = Trunk(in_features=5, moe=_moe(router="task", k=1), depth=2)
    x, tid = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    seen = []
    for b in t.blocks:
        b.moe.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["task_id"]), with_kwargs=True)
    t(x, task_id=tid)
    assert len(seen) == 2 and all(s is tid for s in seen)
    assert not torch.equal(t(x, task_id=torch.zeros(6, dtype=torch.long)).y, t(x, task_id=tid).y)


def test_depth_copies_are_independent_and_drawn_after_the_input_layer():
    torch.manual_seed(0)
    moe = _moe()
    t = Trunk(in_features=5, moe=moe, depth=3)
    assert t.blocks[0].moe is moe
    p0, p1, p2 = (dict(b.moe.named_parameters()) for b in t.blocks)
    for n in p0:
        assert p0[n].data_ptr() != p1[n].data_ptr() and not torch.equal(p1[n], p2[n]), n
    # the random-number order MoEMLP always had: inp first, then the copies
    torch.manual_seed(0)
    moe = _moe()
    inp = nn.Linear(5, D)
    copies = [reinitialize(copy.deepcopy(moe)) for _ in range(2)]
    assert torch.equal(inp.weight, t.inp.weight)
    assert all(torch.equal(a, b) for c, blk in zip(copies, t.blocks[1:]) for a, b in zip(c.parameters(), blk.moe.parameters()))
    before = [p.clone() for p in t.blocks[2].moe.parameters()]
    with torch.no_grad():
        for p in t.blocks[1].moe.parameters():
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(before, t.blocks[2].moe.parameters()))


def test_a_list_of_moes_is_built_before_the_input_layer_and_parameters_follow_that_order():
    torch.manual_seed(0)
    moes = [_moe(router="task") for _ in range(2)]
    t = Trunk(in_features=5, moe=moes)
    torch.manual_seed(0)
    ref_moes = [_moe(router="task") for _ in range(2)]
    ref_inp = nn.Linear(5, D)
    assert torch.equal(t.inp.weight, ref_inp.weight) and [b.moe for b in t.blocks] == moes
    assert next(iter(t.named_parameters()))[0].startswith("blocks.0.")  # the order TaskMoENet's optimizer state has
    assert all(torch.equal(a, b) for m, r in zip(moes, ref_moes) for a, b in zip(m.parameters(), r.parameters()))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="activation='gelu'"):
        Trunk(in_features=3, moe=_moe(), activation="gelu")
    with pytest.raises(ValueError, match="depth must be >= 1"):
        Trunk(in_features=3, moe=_moe(), depth=0)
    with pytest.raises(ValueError, match="tokens must be None or >= 1"):
        Trunk(in_features=3, moe=_moe(), tokens=0)
    with pytest.raises(TypeError, match="sequence of MoEs"):
        Trunk(in_features=3, moe=[])


def test_moemlp_is_the_trunk_plus_a_head_with_its_old_names():
    torch.manual_seed(0)
    net = MoEMLP(in_features=12, out_features=3, moe=_moe(), depth=2)
    assert isinstance(net, Trunk) and isinstance(net.blocks[0], MoEBlock)
    assert [k.split(".")[0] for k in net.state_dict()] == ["inp"] * 2 + ["blocks"] * (len(net.state_dict()) - 6) + ["norm"] * 2 + ["head"] * 2
    x = torch.randn(4, 3, 4)  # flattened from dim 1
    torch.testing.assert_close(net(x).y, net.head(Trunk.forward(net, x.flatten(1)).y), rtol=0, atol=0)


def test_routing_off_is_one_always_on_expert_in_the_same_trunk():
    """``num_experts: 1, top_k: 1``: the same trunk class, every token through the one expert, every parameter active."""
    from moeparadigms.nets import active_params_per_token, count_params

    torch.manual_seed(0)
    t = Trunk(in_features=5, moe=_moe(E=1, k=1))
    out = t(torch.randn(6, 5))
    assert type(t) is Trunk and out.stats[0].tokens_per_expert.tolist() == [6]
    assert active_params_per_token(t) == count_params(t)


# ---------------------------------------------------------------------------------------------- old checkpoints
def _equal_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_policy_net_loads_weights_saved_with_the_old_names():
    pytest.importorskip("gymnasium")
    from moeparadigms.paradigms.rl import PPO

    torch.manual_seed(0)
    ppo = PPO(network="moe", hidden=D, moe=_moe())
    ppo.build(4, {"kind": "discrete", "n": 2})
    old = to_old_names(to_old_names(ppo.state_dict(), POLICY_MOE, "actor."), POLICY_MOE, "critic.")
    assert "actor.inp.weight" in old and "critic.block.norm.weight" in old and not any(".trunk." in k for k in old)
    torch.manual_seed(1)
    fresh = PPO(network="moe", hidden=D, moe=_moe())
    fresh.build(4, {"kind": "discrete", "n": 2})
    fresh.load_state_dict(dict(old))  # strict, through the pre-hook
    _equal_state(ppo, fresh)
    check_compatible(fresh, {"state_dict": old})  # what on_load_checkpoint runs: renames in place, then compares
    assert "actor.trunk.inp.weight" in old and "actor.inp.weight" not in old


def test_meta_net_and_its_meta_sgd_rates_load_the_old_names():
    from moeparadigms.paradigms.meta import MetaMoE

    def model(seed):
        torch.manual_seed(seed)
        return MetaMoE(moe=_moe(), learn_inner_lr=True, context_dim=2, in_features=1, out_features=1, task_kind="regression")

    m, fresh = model(0), model(1)
    assert m.net.trunk is not None
    old = to_old_names(to_old_names(m.state_dict(), META_MOE, "net."), META_SGD_RATES, "inner_lrs.")
    assert "net.body.0.weight" in old and "inner_lrs.body__0__weight" in old and "net.block.norm.weight" in old
    fresh.load_state_dict(old)
    _equal_state(m, fresh)
