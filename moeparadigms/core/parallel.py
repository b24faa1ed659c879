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
from .dispatchers import Dispatched, Dispatcher
from .experts import Experts
from .layer import MoE, MoEOutput
from .routing import ExpertChoiceRouter, Routing, SoftMoERouter


class AllToAllDispatcher(Dispatcher):
    """Dispatch -> experts -> combine across ranks: tokens are permuted by (global) expert as in the
    single-process token-choice path, sent to the rank that holds their expert with one all-to-all, run through
    that rank's slice of the experts, sent back with a second all-to-all and combined where they came from.
    Token-choice routings, dropless. ``experts`` is the local bank (experts ``[rank * L, (rank + 1) * L)``)."""

    def __init__(self, *, num_experts: int, group: dist.ProcessGroup | None = None) -> None:
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.world:
            raise ValueError(f"num_experts={num_experts} must be divisible by the world size {self.world}")
        self.num_experts, self.local = num_experts, num_experts // self.world

    def __repr__(self) -> str:
        return f"AllToAllDispatcher(num_experts={self.num_experts}, world={self.world}, rank={self.rank})"

    def __call__(
        self, x_TD: Tensor, routing: Routing, experts: Experts, capacity: int | None = None, count: bool = True
    ) -> Dispatched:
        if capacity is not None:
            raise ValueError(f"expert parallelism is dropless: got a capacity of {capacity}, expected None "
                             "(capacity_factor=None)")
        if routing.ids_TK is None or routing.weights_TK is None:
            raise ValueError("expert parallelism needs a token-choice routing (ids_TK): top-k, switch, hash, "
                             "task-conditioned or bias-balanced routers")
        E, W, L = self.num_experts, self.world, self.local
        # dispatch: sorted by global expert, so by destination rank too
        perm = dsp.topk_permutation(routing.ids_TK, E)
        x_AD = dsp.permute_topk(x_TD, perm)
        # 1. how many rows go to each (rank, local expert); everyone learns what it will receive
        send_counts_E = perm.counts_E
        recv_counts = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts, send_counts_E, group=self.group)  # (W * L,): source-major
        send_split = send_counts_E.view(W, L).sum(1).tolist()
        recv_split = recv_counts.view(W, L).sum(1).tolist()
        # 2. rows to their experts' ranks
        recv = x_AD.new_empty(sum(recv_split), x_AD.shape[-1])
        recv = all_to_all_single(recv, x_AD, recv_split, send_split, group=self.group)
        # 3. received rows are grouped by source, then local expert: regroup by local expert; experts
        local_id = torch.arange(L, device=x_TD.device).repeat(W).repeat_interleave(recv_counts)
        order = torch.argsort(local_id, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=x_TD.device)
        y_local = experts(recv[order], recv_counts.view(W, L).sum(0))[inverse]
        # 4. combine: outputs back to where their tokens live, then the usual weighted sum
        back = x_AD.new_empty(x_AD.shape)
        back = all_to_all_single(back, y_local, send_split, recv_split, group=self.group)
        y_TD = dsp.unpermute_topk(back, routing.weights_TK, perm).to(x_TD.dtype)
        return Dispatched(y_TD, perm.counts_E, perm.dropped, routing.ids_TK.numel())


class ExpertParallelMoE(nn.Module):
    """Shard ``moe``'s experts over the ranks of ``group``; ``forward`` matches the unsharded layer.

    Every rank must build ``moe`` identically (same seed), then wrap it: rank r keeps experts
    ``[r * E / W, (r + 1) * E / W)`` and the layer gets an :class:`AllToAllDispatcher` (``moe.dispatcher``), so
    ``forward`` is ``moe.forward`` itself: the same routing, losses, statistics and inference options.
    Token-choice routers only (top-k, switch, hash, task-conditioned, bias-balanced), dropless.
    """

    def __init__(self, moe: MoE, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ExpertParallelMoE needs torch.distributed to be initialised (init_process_group)")
        if moe.capacity_factor is not None:
            raise ValueError(f"ExpertParallelMoE is dropless: got capacity_factor={moe.capacity_factor}, expected None")
        if isinstance(moe.router, (ExpertChoiceRouter, SoftMoERouter)):
            raise ValueError(f"ExpertParallelMoE needs a token-choice router, got {type(moe.router).__name__} "
                             "(top-k, switch, hash, task-conditioned or bias-balanced routers)")
        dispatcher = AllToAllDispatcher(num_experts=moe.num_experts, group=group)
        self.group, self.world, self.rank = group, dispatcher.world, dispatcher.rank
        self.num_experts, self.local = dispatcher.num_experts, dispatcher.local
        keep = torch.zeros(self.num_experts, dtype=torch.bool)
        keep[self.rank * self.local : (self.rank + 1) * self.local] = True
        moe.experts.prune(keep)  # this rank's experts only; the router keeps all E rows
        moe.dispatcher = dispatcher
        self.moe = moe

    def expert_parameters(self) -> list[nn.Parameter]:
        return list(self.moe.experts.parameters())

    def forward(self, x: Tensor, *, task_id: int | Tensor | None = None) -> MoEOutput:
        """:meth:`MoE.forward <moeparadigms.core.MoE.forward>` with the experts spread over the ranks."""
        return self.moe(x, task_id=task_id)


def ignore_expert_parameters_in_ddp(module: nn.Module) -> None:
    """Tell DDP not to average the sharded experts' gradients (each rank owns different experts)."""
    names = []
    for name, m in module.named_modules():
        if isinstance(m, ExpertParallelMoE):
            names += [f"{name}.moe.experts.{n}".lstrip(".") for n, _ in m.moe.experts.named_parameters()]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
