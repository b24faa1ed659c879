"""The aux-loss-free bias update (DeepSeek-V3) once per optimizer step, torchtitan's way: forwards accumulate the
load, ``update_router_biases`` applies ``b += rate * sign(mean - load)`` and resets it."""
from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeparadigms.core import BiasBalancedRouter, MLPExperts, MoE, register_bias_update, update_router_biases

from .reference import free_port

D, E, RATE = 6, 4, 0.01


def _moe(seed: int = 0, top_k: int = 1) -> MoE:
    torch.manual_seed(seed)
    router = BiasBalancedRouter(d_model=D, num_experts=E, top_k=top_k, bias_update_rate=RATE)
    with torch.no_grad():
        router.gate.blocks[0][0] += 1.5  # expert 0 attracts most tokens: the bias has work to do
    return MoE(router=router, experts=MLPExperts(d_model=D, hidden=5, num_experts=E))


def test_update_is_the_papers_formula_over_the_accumulated_load():
    router = _moe().router
    router.tokens_per_expert.copy_(torch.tensor([5, 1, 2, 0]))  # mean 2: experts 0 / 1, 3 / 2 over / under / at it
    router.expert_bias.copy_(torch.tensor([0.5, 0.0, -0.25, 0.0]))
    assert update_router_biases(router) == 1
    torch.testing.assert_close(router.expert_bias, torch.tensor([0.5 - RATE, RATE, -0.25, RATE]), rtol=0, atol=0)
    assert int(router.tokens_per_expert.abs().sum()) == 0
    update_router_biases(router)  # nothing accumulated since: no change
    torch.testing.assert_close(router.expert_bias, torch.tensor([0.5 - RATE, RATE, -0.25, RATE]), rtol=0, atol=0)


def test_only_training_forwards_with_autograd_count():
    moe = _moe()
    x = torch.randn(10, D)
    moe.eval()(x)
    with torch.no_grad():
        moe.train()(x)  # a rollout in train mode: inference, not counted
    assert int(moe.router.tokens_per_expert.sum()) == 0
    out = moe(x)
    assert torch.equal(moe.router.tokens_per_expert, out.stats.tokens_per_expert)


def _old_in_forward_update(moe: MoE, out) -> None:
    """What BiasBalancedRouter.forward did before: the update right after the selection, from this forward's load."""
    load = out.stats.tokens_per_expert.float()
    with torch.no_grad():
        moe.router.expert_bias += RATE * torch.sign(load.mean() - load)
    moe.router.tokens_per_expert.zero_()


@pytest.mark.parametrize("how", ["function", "optimizer hook"])
def test_one_forward_per_step_gives_the_old_in_forward_sequence(how):
    old, new = _moe(), _moe()
    opt_old, opt_new = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (old, new))
    if how == "optimizer hook":
        register_bias_update(opt_new, new)
    gen = torch.Generator().manual_seed(1)
    biases = []
    for _ in range(6):
        x = torch.randn(16, D, generator=gen) + 0.3
        for m, opt in ((old, opt_old), (new, opt_new)):
            out = m(x)
            if m is old:
                _old_in_forward_update(m, out)
            opt.zero_grad()
            (out.y.square().mean() + out.aux_loss).backward()
            if m is new and how == "function":
                update_router_biases(m)
            opt.step()
        assert torch.equal(old.router.expert_bias, new.router.expert_bias)
        biases.append(new.router.expert_bias.clone())
    assert not torch.equal(biases[0], biases[-1]), "the bias must have moved"
    for a, b in zip(old.parameters(), new.parameters()):
        assert torch.equal(a, b)


def test_two_micro_batches_per_step_update_from_both():
    moe = _moe()
    r = moe.router
    x1 = r.gate.blocks[0][0].detach().expand(8, D) * 3  # every token of the first micro-batch picks expert 0
    x2 = torch.randn(8, D)
    with torch.no_grad():
        c1 = moe.eval()(x1).stats.tokens_per_expert.float()
        c2 = moe(x2).stats.tokens_per_expert.float()
    moe.train()
    assert c1[0] == 8 and not torch.equal(torch.sign(c2.mean() - c2), torch.sign((c1 + c2).mean() - (c1 + c2)))
    moe(x1)
    moe(x2)  # the bias does not move between micro-batches, so the choices are the ones counted above
    update_router_biases(moe)
    both = c1 + c2
    torch.testing.assert_close(r.expert_bias, RATE * torch.sign(both.mean() - both), rtol=0, atol=0)


def test_checkpoint_keeps_bias_and_pending_counts():
    moe = _moe()
    moe(torch.randn(12, D))
    update_router_biases(moe)
    moe(torch.randn(12, D))  # counts pending: saved mid-step (gradient accumulation)
    sd = moe.state_dict()
    assert {"router.expert_bias", "router.tokens_per_expert"} <= set(sd)
    resumed = _moe(seed=5)
    resumed.load_state_dict(sd)
    assert torch.equal(resumed.router.tokens_per_expert, moe.router.tokens_per_expert)
    update_router_biases(moe), update_router_biases(resumed)
    assert torch.equal(resumed.router.expert_bias, moe.router.expert_bias)
    # a state dict from before the counts existed loads, with nothing pending
    old = {k: v for k, v in sd.items() if k != "router.tokens_per_expert"}
    resumed.load_state_dict(old)
    assert int(resumed.router.tokens_per_expert.abs().sum()) == 0


def test_growth_and_pruning_keep_the_counts_aligned():
    moe = _moe()
    moe(torch.randn(12, D))
    counts = moe.router.tokens_per_expert.clone()
    moe.add_experts(2)
    assert torch.equal(moe.router.tokens_per_expert, torch.cat([counts, torch.zeros(2, dtype=torch.long)]))
    moe.prune_experts([0, 4])
    assert torch.equal(moe.router.tokens_per_expert, torch.cat([counts[1:], torch.zeros(1, dtype=torch.long)]))


# ---------------------------------------------------------------------------- data parallel: the load of all ranks
WORLD = 2


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        one = _moe()
        with torch.no_grad():
            one.router.gate.blocks[0].copy_(5 * torch.eye(E, D))
        # rank 0's tokens all pick expert 0, rank 1's expert 1: each rank's own load gives another update
        x = torch.eye(E, D)[[0] * 10 + [1] * 10] + 0.01 * torch.randn(20, D, generator=torch.Generator().manual_seed(3))
        one(x)  # one process, the global batch
        ranks = copy.deepcopy(one)
        ranks.router.tokens_per_expert.zero_()
        ranks(x[rank * 10 : (rank + 1) * 10])  # this rank's half
        assert not torch.equal(ranks.router.tokens_per_expert, one.router.tokens_per_expert)
        counts, local = one.router.tokens_per_expert.float(), ranks.router.tokens_per_expert.float()
        assert not torch.equal(torch.sign(counts.mean() - counts), torch.sign(local.mean() - local))
        update_router_biases(ranks)
        with torch.no_grad():
            one.router.expert_bias += RATE * torch.sign(counts.mean() - counts)
        assert torch.equal(ranks.router.expert_bias, one.router.expert_bias)
    finally:
        dist.destroy_process_group()


def test_data_parallel_update_uses_the_load_of_every_rank():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)
