"""Expert parallelism with torch.distributed all-to-all (gloo, 2 CPU processes) equals the single-process layer."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeparadigms.core import FFN, ExpertChoiceRouter, MLPExperts, MoE, TopKRouter
from moeparadigms.core.parallel import ExpertParallelMoE, ignore_expert_parameters_in_ddp

from .reference import free_port

WORLD, T, D, E = 2, 12, 8, 4


def _build():
    torch.manual_seed(0)
    return MoE(router=TopKRouter(d_model=D, num_experts=E, top_k=2),
               experts=MLPExperts(d_model=D, hidden=6, num_experts=E, bias=True),
               shared_experts=FFN(d_model=D, hidden=4)).double()


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        gen = torch.Generator().manual_seed(1)
        x_all = torch.randn(WORLD * T, D, generator=gen, dtype=torch.float64)
        g_all = torch.randn(WORLD * T, D, generator=gen, dtype=torch.float64)
        ref = _build()
        xr = x_all.clone().requires_grad_(True)
        y_ref = ref(xr).y
        (y_ref * g_all).sum().backward()

        ep = ExpertParallelMoE(_build())
        sl = slice(rank * T, (rank + 1) * T)
        x = x_all[sl].clone().requires_grad_(True)
        out = ep(x.view(3, 4, D))
        (out.y.view(T, D) * g_all[sl]).sum().backward()

        torch.testing.assert_close(out.y.view(T, D), y_ref[sl])
        torch.testing.assert_close(x.grad, xr.grad[sl])
        # the forward is MoE.forward with the all-to-all dispatcher: the unsharded layer's losses and statistics
        # on the same (local) tokens, and its inference options
        same = ref(x_all[sl].view(3, 4, D))
        assert out.losses.keys() == same.losses.keys() == {"load_balance", "z_loss"}
        for k in out.losses:
            torch.testing.assert_close(out.losses[k], same.losses[k], rtol=0, atol=0)
        torch.testing.assert_close(out.aux_loss, same.aux_loss, rtol=0, atol=0)
        for name, a, b in zip(out.stats._fields, out.stats, same.stats):
            assert torch.equal(a, b), name
        with torch.no_grad():
            ep.moe.stats_in_inference = False
            quiet = ep(x_all[sl])
            ep.moe.stats_in_inference = True
        assert quiet.stats is None and quiet.losses == {} and torch.equal(quiet.y, out.y.detach().view(T, D))
        with pytest.raises(ValueError, match="needs a token-choice router, got ExpertChoiceRouter"):
            ExpertParallelMoE(MoE(router=ExpertChoiceRouter(d_model=D, num_experts=E), experts=MLPExperts(d_model=D, hidden=6, num_experts=E)))
        # expert grads: every token routed to this rank's experts, from both ranks, contributed
        local = slice(rank * E // WORLD, (rank + 1) * E // WORLD)
        torch.testing.assert_close(ep.moe.experts.w1.blocks[0].grad,
                                   ref.experts.w1.blocks[0].grad[local])
        torch.testing.assert_close(ep.moe.experts.b2.blocks[0].grad, ref.experts.b2.blocks[0].grad[local])
        # replicated parts: the sum over ranks of the local gradients is the full-batch gradient (what DDP's
        # averaging gives up to the 1/W factor)
        for p_ep, p_ref in [(ep.moe.router.gate.blocks[0], ref.router.gate.blocks[0]),
                            (ep.moe.shared_experts.fc1.weight, ref.shared_experts.fc1.weight)]:
            grad = p_ep.grad.clone()
            dist.all_reduce(grad)
            torch.testing.assert_close(grad, p_ref.grad)

        # under DDP the replicated parameters are averaged and the sharded experts left alone
        ep2 = ExpertParallelMoE(_build())
        ignore_expert_parameters_in_ddp(ep2)
        ddp = torch.nn.parallel.DistributedDataParallel(ep2)
        (ddp(x_all[sl]).y * g_all[sl]).sum().backward()
        torch.testing.assert_close(ep2.moe.experts.w1.blocks[0].grad, ref.experts.w1.blocks[0].grad[local])
        torch.testing.assert_close(ep2.moe.router.gate.blocks[0].grad, ref.router.gate.blocks[0].grad / WORLD)
    finally:
        dist.destroy_process_group()


def test_all_to_all_expert_parallel_equals_single_process():
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)


def test_all_to_all_expert_parallel_needs_init():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(_build())
