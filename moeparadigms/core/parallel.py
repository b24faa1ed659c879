"""Expert parallelism over ``torch.distributed``: each rank holds a contiguous slice of the experts,
tokens travel to the rank of their expert and back with two all-to-all exchanges.

The router (and any shared experts) is replicated: wrap the model in DDP (or Lightning's ``ddp``
strategy) as usual, and keep the expert parameters out of DDP's gradient averaging, since each rank owns
different experts (``ExpertParallelMoE.expert_parameters()`` lists them; with Lightning use
``DDPStrategy(find_unused_parameters=False)`` and call :func:`ignore_expert_parameters_in_ddp` before
wrapping). Works with gloo (CPU) and NCCL (GPU).

Shape legend: T local tokens, D width, E experts (global), W world size, A assignments.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.nn.functional import all_to_all_single

from . import dispatch as dsp
from .layer import MoE, MoEOutput, RoutingStats


class ExpertParallelMoE(nn.Module):
    """Shard ``moe``'s experts over the ranks of ``group``; ``forward`` matches the unsharded layer.

    Every rank must build ``moe`` identically (same seed), then wrap it: rank r keeps experts
    ``[r * E / W, (r + 1) * E / W)``. Token-choice routers only (top-k, switch, hash, task-conditioned,
    bias-balanced), dropless.
    """

    def __init__(self, moe: MoE, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs torch.distributed to be initialised (init_process_group)")
        if moe.capacity_factor is not None:
            raise ValueError(f"ExpertParallelMoE is dropless: got capacity_factor={moe.capacity_factor}, expected None")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        E = moe.num_experts
        if E % self.world:
            raise ValueError(f"num_experts={E} must be divisible by the world size {self.world}")
        self.num_experts = E
        self.local = E // self.world
        keep = torch.zeros(E, dtype=torch.bool)
        keep[self.rank * self.local : (self.rank + 1) * self.local] = True
        moe.experts.prune(keep)  # this rank's experts only; the router keeps all E rows
        self.moe = moe

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.moe.experts.parameters())

    def forward(self, x: Tensor, *, task_id: int | Tensor | None = None) -> MoEOutput:
        moe = self.moe
        lead = x.shape[:-1]
        x_TD = x.reshape(-1, moe.d_model)
        routing = moe.router(x_TD, task_id_T=moe._task_ids(task_id, lead, x.device))
        if routing.ids_TK is None or routing.weights_TK is None:
            raise ValueError(f"ExpertParallelMoE needs a token-choice router, got {type(moe.router).__name__}")
        E, W, L = self.num_experts, self.world, self.local
        perm = dsp.topk_permutation(routing.ids_TK, E)
        x_AD = dsp.permute_topk(x_TD, perm)  # sorted by global expert, so by destination rank too
        # 1. how many rows go to each (rank, local expert); everyone learns what it will receive
        send_counts_E = perm.counts_E
        recv_counts = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts, send_counts_E, group=self.group)  # (W * L,): source-major
        send_split = send_counts_E.view(W, L).sum(1).tolist()
        recv_split = recv_counts.view(W, L).sum(1).tolist()
        # 2. rows to their experts' ranks
        recv = x_AD.new_empty(sum(recv_split), x_AD.shape[-1])
        recv = all_to_all_single(recv, x_AD, recv_split, send_split, group=self.group)
        # 3. received rows are grouped by source, then local expert: regroup by local expert
        local_id = torch.arange(L, device=x.device).repeat(W).repeat_interleave(recv_counts)
        order = torch.argsort(local_id, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=x.device)
        y_local = moe.experts(recv[order], recv_counts.view(W, L).sum(0))[inverse]
        # 4. outputs back to where their tokens live, then the usual weighted combine
        back = x_AD.new_empty(x_AD.shape)
        back = all_to_all_single(back, y_local, send_split, recv_split, group=self.group)
        y_TD = dsp.unpermute_topk(back, routing.weights_TK, perm).to(x_TD.dtype)
        if moe.shared_experts is not None:
            y_TD = y_TD + moe.shared_experts(x_TD)
        losses, entropy = moe._router_losses(routing), moe._entropy(routing.probs_TE, routing.weight_A)
        aux = moe.weighted_aux_loss(losses).to(x_TD.device)
        stats = RoutingStats(perm.counts_E.detach(), perm.dropped, torch.tensor(routing.ids_TK.numel()), entropy,
                             torch.tensor(x_TD.shape[0]))
        return MoEOutput(y_TD.reshape(*lead, y_TD.shape[-1]).to(x.dtype), aux, losses, stats)


def ignore_expert_parameters_in_ddp(module: nn.Module) -> None:
    """Tell DDP not to average the sharded experts' gradients (each rank owns different experts)."""
    names = []
    for name, m in module.named_modules():
        if isinstance(m, ExpertParallelMoE):
            names += [f"{name}.moe.experts.{n}".lstrip(".") for n, _ in m.moe.experts.named_parameters()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
