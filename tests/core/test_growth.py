"""Adding, freezing and pruning experts at run time, with the router, optimizer and state dict kept consistent."""
from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from moeparadigms.core import (
    BiasBalancedRouter,
    ExpertChoiceRouter,
    GLUExperts,
    HashRouter,
    MLPExperts,
    ModuleExperts,
    MoE,
    SoftMoERouter,
    TaskConditionedRouter,
    TopKRouter,
    remap_optimizer,
)

D, E = 8, 3

ROUTERS = {
    "topk": lambda: TopKRouter(d_model=D, num_experts=E, top_k=2, noisy=True),
    "bias": lambda: BiasBalancedRouter(d_model=D, num_experts=E, top_k=2),
    "task-gate": lambda: TaskConditionedRouter(d_model=D, num_experts=E, num_tasks=2, conditioning="gate"),
    "task-concat": lambda: TaskConditionedRouter(d_model=D, num_experts=E, num_tasks=2),
    "expert-choice": lambda: ExpertChoiceRouter(d_model=D, num_experts=E),
    "hash": lambda: HashRouter(d_model=D, num_experts=E),
    "soft": lambda: SoftMoERouter(d_model=D, num_experts=E, slots_per_expert=2),
}
BANKS = {
    "mlp": lambda: MLPExperts(d_model=D, hidden=5, num_experts=E, bias=True),
    "glu": lambda: GLUExperts(d_model=D, hidden=5, num_experts=E),
    "modules": lambda: ModuleExperts(d_model=D, prototype=nn.Linear(D, D), num_experts=E),
}


def _task(moe):
    return 1 if isinstance(moe.router, TaskConditionedRouter) else None


def _expert_outputs(bank, x):
    """Each expert applied to all of x: (E, n, D)."""
    n = x.shape[0]
    rows = x.repeat(bank.num_experts, 1)
    counts = torch.full((bank.num_experts,), n, dtype=torch.long)
    return bank(rows, counts).reshape(bank.num_experts, n, -1)


@pytest.mark.parametrize("init", ["copy", "mean", "fresh"])
@pytest.mark.parametrize("bank", list(BANKS))
@pytest.mark.parametrize("router", list(ROUTERS))
def test_growth_keeps_existing_experts_and_runs(router, bank, init):
    moe = MoE(router=ROUTERS[router](), experts=BANKS[bank]())
    x = torch.randn(12, D)
    before = _expert_outputs(moe.experts, x).detach()
    moe.add_experts(2, init=init, source=[0] if init == "copy" else None)
    assert moe.num_experts == moe.router.num_experts == E + 2
    after = _expert_outputs(moe.experts, x).detach()
    assert torch.equal(after[:E], before)
    if init == "copy":
        assert torch.equal(after[E], before[0]) and torch.equal(after[E + 1], before[0])
    out = moe(x.reshape(3, 4, D), task_id=_task(moe))
    assert out.y.shape == (3, 4, D)
    assert out.stats.tokens_per_expert.numel() == E + 2
    (out.y.sum() + out.aux_loss).backward()


def test_growth_router_rows_copy_routes_like_source():
    moe = MoE(router=TopKRouter(d_model=D, num_experts=E, top_k=1), experts=BANKS["mlp"]())
    moe.add_experts(1, init="copy", source=[1])
    logits = moe.router(torch.randn(5, D)).logits_TE
    torch.testing.assert_close(logits[:, E], logits[:, 1])


def test_optimizer_gets_new_parameters_and_keeps_state():
    torch.manual_seed(0)
    moe = MoE(router=TopKRouter(d_model=D, num_experts=E, top_k=2), experts=BANKS["mlp"]())
    opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        moe(torch.randn(16, D)).y.square().mean().backward()
        opt.step()
    old_w1 = moe.experts.w1.blocks[0]
    old_m = opt.state[old_w1]["exp_avg"].clone()
    remap = moe.add_experts(2, init="fresh")
    remap_optimizer(opt, remap)
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in params for p in moe.parameters()), "every model parameter is in the optimizer"
    assert opt.state[old_w1]["exp_avg"].equal(old_m), "untouched blocks keep their state"
    new_w1 = moe.experts.w1.blocks[1]
    before = new_w1.detach().clone()
    opt.zero_grad()
    moe(torch.randn(64, D)).y.square().mean().backward()
    opt.step()
    assert not torch.equal(new_w1.detach(), before), "the new experts are trained"

    # freezing part of a block splits it: the optimizer follows, with Adam moments carried row by row
    m_rows = opt.state[old_w1]["exp_avg"].clone()
    remap = moe.freeze_experts([1])
    remap_optimizer(opt, remap)
    params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in params for p in moe.parameters())
    assert id(old_w1) not in params, "the replaced block left the optimizer"
    blocks = moe.experts.w1.blocks
    assert [b.shape[0] for b in blocks] == [1, 1, 3] and [b.requires_grad for b in blocks] == [True, False, True]
    torch.testing.assert_close(opt.state[blocks[0]]["exp_avg"], m_rows[0:1])
    torch.testing.assert_close(opt.state[blocks[1]]["exp_avg"], m_rows[1:2])


def test_frozen_experts_stay_bit_identical_under_adamw():
    torch.manual_seed(0)
    moe = MoE(router=TopKRouter(d_model=D, num_experts=4, top_k=2), experts=MLPExperts(d_model=D, hidden=5, num_experts=4, bias=True))
    opt = torch.optim.AdamW(moe.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):  # build momentum first, so a masked gradient alone would not keep them still
        opt.zero_grad()
        moe(torch.randn(32, D)).y.square().mean().backward()
        opt.step()
    remap_optimizer(opt, moe.freeze_experts([0, 2]))
    frozen_before = {n: t.detach().clone() for n, t in moe.state_dict().items()}
    for _ in range(5):
        opt.zero_grad()
        moe(torch.randn(32, D)).y.square().mean().backward()
        opt.step()
    after = moe.state_dict()
    for key in ("experts.w1.weight", "experts.w2.weight", "experts.b1.weight", "router.gate.weight"):
        for e in (0, 2):
            assert torch.equal(after[key][e], frozen_before[key][e]), (key, e)
        assert not torch.equal(after[key][1], frozen_before[key][1]), key
    remap_optimizer(opt, moe.unfreeze_experts([0, 2]))
    assert all(p.requires_grad for p in moe.parameters())


def test_prune_removes_experts_and_router_rows():
    moe = MoE(router=BiasBalancedRouter(d_model=D, num_experts=4, top_k=2), experts=MLPExperts(d_model=D, hidden=5, num_experts=4))
    x = torch.randn(10, D)
    before = _expert_outputs(moe.experts, x).detach()
    logits_before = moe.router(x).logits_TE.detach()
    moe.prune_experts([1])
    assert moe.num_experts == 3 and moe.router.expert_bias.numel() == 3
    torch.testing.assert_close(_expert_outputs(moe.experts, x), before[[0, 2, 3]])
    torch.testing.assert_close(moe.router(x).logits_TE, logits_before[:, [0, 2, 3]])
    with pytest.raises(ValueError, match="out of range"):
        moe.prune_experts([7])
    with pytest.raises(ValueError, match="at least one"):
        moe.prune_experts([0, 1, 2])


def test_state_dict_after_growth_loads_into_fresh_model_of_grown_size():
    torch.manual_seed(0)
    moe = MoE(router=TopKRouter(d_model=D, num_experts=E, top_k=2), experts=BANKS["glu"]())
    moe.add_experts(2, init="mean")
    moe.freeze_experts([0, 1])
    buf = io.BytesIO()
    torch.save(moe.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = MoE(router=TopKRouter(d_model=D, num_experts=E + 2, top_k=2), experts=GLUExperts(d_model=D, hidden=5, num_experts=E + 2))
    fresh.load_state_dict(state)
    x = torch.randn(7, D)
    torch.testing.assert_close(fresh(x).y, moe(x).y, rtol=0, atol=0)
    assert fresh.experts.frozen.tolist() == [True, True, False, False, False]
    assert [p.requires_grad for p in fresh.experts.w1.blocks] == [False, True]
    # a model of the wrong size gets a clear error naming the shapes
    small = MoE(router=TopKRouter(d_model=D, num_experts=E, top_k=2), experts=GLUExperts(d_model=D, hidden=5, num_experts=E))
    with pytest.raises(RuntimeError, match=r"experts\.w1\.weight.*\(5, 8, 10\).*\(3, 8, 10\)"):
        small.load_state_dict(state)


def test_growth_bad_arguments():
    moe = MoE(router=TopKRouter(d_model=D, num_experts=E, top_k=2), experts=BANKS["mlp"]())
    with pytest.raises(ValueError, match="init='clone'"):
        moe.add_experts(1, init="clone")
    with pytest.raises(ValueError, match="source expert 9 out of range"):
        moe.add_experts(1, init="copy", source=[9])
    with pytest.raises(ValueError, match="n must be an integer >= 1, got 0"):
        moe.add_experts(0)
    with pytest.raises(ValueError, match="expert id 5 out of range"):
        moe.freeze_experts([5])


def test_state_dict_is_independent_of_block_layout():
    """Checkpoint keys hold one tensor per expert-indexed parameter, whatever the row-block layout."""
    moe = MoE(router=TopKRouter(d_model=D, num_experts=E, top_k=2), experts=BANKS["mlp"]())
    moe.add_experts(3)
    moe.freeze_experts([1, 4])  # blocks [0] [1] [2 3] [4] [5]
    state = moe.state_dict()
    assert not any(".block" in k for k in state), sorted(state)
    fresh = MoE(router=TopKRouter(d_model=D, num_experts=E + 3, top_k=2),
                experts=MLPExperts(d_model=D, hidden=5, num_experts=E + 3, bias=True))
    fresh.freeze_experts([0])  # a different layout before loading
    fresh.load_state_dict(state)  # strict
    x = torch.randn(9, D)
    torch.testing.assert_close(fresh(x).y, moe(x).y, rtol=0, atol=0)
    assert fresh.experts.frozen.tolist() == [False, True, False, False, True, False]
