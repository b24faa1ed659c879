"""Plain reference implementations the fast paths are checked against (slow, obviously correct)."""
from __future__ import annotations

import socket

import torch
import torch.nn.functional as F
from torch import Tensor

from moeparadigms.core import GLUExperts, MLPExperts, ModuleExperts, MoE, SoftMoERouter

ACT = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh")}


def expert_ref(bank, e: int, x_D: Tensor) -> Tensor:
    """One expert applied to one token, with plain ops on that expert's rows."""
    if isinstance(bank, ModuleExperts):
        return bank.experts[e](x_D.unsqueeze(0)).squeeze(0)
    h = x_D @ bank.w1.row(e)
    if bank.b1 is not None:
        h = h + bank.b1.row(e)
    if isinstance(bank, GLUExperts):
        gate, up = h.chunk(2, dim=-1)
        a = ACT[bank.activation](gate) * up
    else:
        assert isinstance(bank, MLPExperts)
        a = ACT[bank.activation](h)
    y = a @ bank.w2.row(e)
    if bank.b2 is not None:
        y = y + bank.b2.row(e)
    return y


def moe_ref(moe: MoE, x: Tensor, task_id=None, capacity: int | None = None) -> Tensor:
    """Per-token loop MoE: y_t = sum over (t, e, w) assignments of w * expert_e(x_t) (+ shared).

    Uses the layer's own router for the decisions (same tensors, so gradients flow the same way).
    ``capacity``: keep only the first ``capacity`` assignments of each expert in token order."""
    x_TD = x.reshape(-1, x.shape[-1])
    T = x_TD.shape[0]
    task = moe.task_ids(task_id, x.shape[:-1], x.device)
    if isinstance(moe.router, SoftMoERouter):
        return soft_ref(moe, x)
    r = moe.router(x_TD, task_id_T=task)
    rows = [torch.zeros_like(x_TD[0]) for _ in range(T)]
    used = [0] * moe.num_experts
    order = sorted(range(r.token_A.numel()), key=lambda a: (int(r.expert_A[a]), a))
    keep = set()
    for a in order:
        e = int(r.expert_A[a])
        if capacity is None or used[e] < capacity:
            keep.add(a)
            used[e] += 1
    for a in range(r.token_A.numel()):
        if a in keep:
            t, e = int(r.token_A[a]), int(r.expert_A[a])
            rows[t] = rows[t] + r.weight_A[a] * expert_ref(moe.experts, e, x_TD[t])
    y = torch.stack(rows)
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(x_TD)
    return y.reshape(x.shape)


def soft_ref(moe: MoE, x: Tensor) -> Tensor:
    """Soft MoE by the paper's equations, one group and one slot at a time."""
    router = moe.router
    groups = x.reshape(-1, x.shape[-2], x.shape[-1]) if x.dim() >= 3 else x.unsqueeze(0)
    phi = router.phi.full().reshape(-1, x.shape[-1])  # (S, D)
    outs = []
    for X in groups:  # (N, D)
        logits = X @ phi.t()  # (N, S)
        Dw = torch.softmax(logits, dim=0)
        Cw = torch.softmax(logits, dim=1)
        slot_out = []
        for s in range(phi.shape[0]):
            e = s // router.slots_per_expert
            slot_in = (Dw[:, s : s + 1] * X).sum(0)
            slot_out.append(expert_ref(moe.experts, e, slot_in))
        Ys = torch.stack(slot_out)  # (S, D)
        outs.append(Cw @ Ys)
    return torch.stack(outs).reshape(x.shape)


def free_port() -> int:
    """A free localhost TCP port for a gloo process group (the spawned-worker tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
