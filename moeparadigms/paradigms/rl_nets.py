"""The PPO actor-critic's parts: observation normalisation, the policy/value network, GAE.

Shape legend: S rollout steps, N environments, B minibatch, O observation features.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..core import MoE, SoftMoERouter, TaskConditionedRouter
from ..nets import Trunk, rename_old_keys


# ---------------------------------------------------------------------------------------------- networks
class RunningMeanStd(nn.Module):
    """Observation normalisation statistics (Welford/Chan parallel update), kept as buffers."""

    def __init__(self, shape: tuple[int, ...], clip: float = 10.0) -> None:
        super().__init__()
        self.clip = clip
        self.register_buffer("mean", torch.zeros(shape, dtype=torch.float64))
        self.register_buffer("var", torch.ones(shape, dtype=torch.float64))
        self.register_buffer("count", torch.tensor(1e-4, dtype=torch.float64))

    def update(self, x: Tensor) -> None:
        x = x.double()
        b_mean, b_var, n = x.mean(0), x.var(0, unbiased=False), x.shape[0]
        delta, tot = b_mean - self.mean, self.count + n
        self.var.copy_((self.var * self.count + b_var * n + delta.square() * self.count * n / tot) / tot)
        self.mean.add_(delta * n / tot)
        self.count.copy_(tot)

    def forward(self, x: Tensor) -> Tensor:
        return ((x.double() - self.mean) / (self.var + 1e-8).sqrt()).clamp(-self.clip, self.clip).to(x.dtype)


class PolicyNet(nn.Module):
    """``obs -> Trunk (tanh(Linear) -> MoEBlock, no final norm) -> head`` or, dense (``moe=None``, SB3's MlpPolicy
    baseline, kept a plain MLP), ``obs -> tanh(Linear) -> tanh(Linear) -> head``; returns (output, MoE aux loss,
    stats). Routing off in the trunk is ``moe`` with one expert and ``top_k: 1`` (see :class:`~moeparadigms.nets.Trunk`).

    With a :class:`SoftMoERouter` the trunk views each sample's ``hidden`` features as its own sequence of
    ``hidden / d_model`` tokens (Soft MoE mixes the tokens of a sequence: one environment's action never depends
    on another's observation). ``num_heads > 1``: one output head per task, the row of ``task_id`` is used
    (multi-task RL). A ``TaskConditionedRouter`` in the MoE block routes on ``task_id`` too."""

    def __init__(self, obs_dim: int, out_dim: int, hidden: int, moe: MoE | None, head_gain: float, num_heads: int = 1) -> None:
        super().__init__()
        self.trunk: Trunk | None = None
        if moe is None:
            self.inp, self.mid = nn.Linear(obs_dim, hidden), nn.Linear(hidden, hidden)
        else:
            soft = isinstance(moe.router, SoftMoERouter)
            if hidden % moe.d_model if soft else hidden != moe.d_model:
                raise ValueError(f"hidden={hidden} must {'be a multiple of' if soft else 'equal'} moe.d_model={moe.d_model}")
            self.trunk = Trunk(in_features=obs_dim, moe=moe, activation="tanh", final_norm=False,
                               tokens=hidden // moe.d_model if soft else None)
            rename_old_keys(self, {"inp.": "trunk.inp.", "block.": "trunk.blocks.0."})  # names before the trunk
        self.num_heads, self.out_dim = num_heads, out_dim
        self.head = nn.Linear(hidden, out_dim * num_heads)
        self.task_routed = moe is not None and isinstance(moe.router, TaskConditionedRouter)
        for lin in (self.inp, self.mid) if self.trunk is None else (self.trunk.inp,):
            nn.init.orthogonal_(lin.weight, math.sqrt(2))
            nn.init.zeros_(lin.bias)
        nn.init.orthogonal_(self.head.weight, head_gain)
        nn.init.zeros_(self.head.bias)

    def _head(self, z: Tensor, task_id: Tensor | None) -> Tensor:
        out = self.head(z)
        if self.num_heads == 1:
            return out
        return out.view(out.shape[0], self.num_heads, self.out_dim)[torch.arange(out.shape[0]), task_id]

    def forward(self, x: Tensor, task_id: Tensor | None = None) -> tuple[Tensor, Tensor, Any]:
        """``x [B, O]``, ``task_id [B]`` (long; needed with several heads or task routing) -> ``[B, out]``."""
        if self.trunk is None:
            h = torch.tanh(self.mid(torch.tanh(self.inp(x))))
            return self._head(h, task_id), h.new_zeros(()), None
        out = self.trunk(x, task_id=task_id if self.task_routed else None)
        return self._head(out.y, task_id), out.aux_loss, out.stats[0]


# ---------------------------------------------------------------------------------------------- GAE
def gae(rewards: Tensor, values: Tensor, next_value: Tensor, terminated: Tensor, truncated: Tensor, valid: Tensor,
        gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over a NEXT_STEP-autoreset rollout. All inputs ``[S, N]`` except
    ``next_value [N]``. A terminated step bootstraps nothing; a truncated step bootstraps from the value of
    its final observation (``values[t + 1]``, the observation the reset step was fed); reset steps
    (``valid == 0``) get zero advantage and cut the recursion. Returns (advantages, returns)."""
    S = rewards.shape[0]
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(next_value)
    for t in reversed(range(S)):
        nv = values[t + 1] if t + 1 < S else next_value
        done = (terminated[t] + truncated[t]).clamp(max=1)
        delta = rewards[t] + gamma * nv * (1 - terminated[t]) - values[t]
        last = (delta + gamma * lam * (1 - done) * last) * valid[t]
        adv[t] = last
    return adv, adv + values


__all__ = ["RunningMeanStd", "PolicyNet", "gae"]
