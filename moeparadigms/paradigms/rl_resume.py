"""Exact resume of :class:`~moeparadigms.paradigms.rl.PPO`: the rollout state its checkpoint carries beside the
weights (current observations and autoreset flags, the torch RNG, episode statistics and, where
:mod:`~moeparadigms.benchmarks.gym` can capture it, every sub-environment's state and RNG)."""
from __future__ import annotations

import warnings
from collections import deque
from typing import Any

import torch

from ..benchmarks.gym import capture_vector_state, restore_vector_state


def rollout_state(ppo: Any, envs: Any) -> dict[str, Any]:
    """What the next PPO update depends on beyond the weights and the optimizer (plain data and tensors)."""
    return {
        "next_obs": ppo.next_obs.clone(), "next_autoreset": ppo.next_autoreset.clone(),
        "disc_return": ppo.disc_return.clone(),
        "torch_rng": torch.get_rng_state(), "recent_returns": list(ppo.recent_returns),
        "recent_success": list(ppo.recent_success),
        "history": [list(x) for x in ppo.history],
        **capture_vector_state(envs),
    }


def restore_rollout_state(ppo: Any, envs: Any, s: dict[str, Any]) -> None:
    """Put :func:`rollout_state`'s ``s`` back into ``ppo`` and ``envs`` (episodes restart where the env state
    cannot be restored)."""
    if restore_vector_state(envs, s, seed=ppo.trainer.datamodule.seed):
        ppo.next_obs, ppo.next_autoreset = s["next_obs"], s["next_autoreset"]
    else:
        warnings.warn("this environment's state cannot be checkpointed: the resumed run restarts its episodes",
                      RuntimeWarning, stacklevel=2)
        obs, _ = envs.reset(seed=ppo.trainer.datamodule.seed + int(ppo.env_steps))
        ppo.next_obs, ppo.next_autoreset = torch.as_tensor(obs, dtype=torch.float32), torch.zeros(envs.num_envs)
    torch.set_rng_state(s["torch_rng"])
    ppo.disc_return = s["disc_return"].clone()
    ppo.recent_returns = deque(s["recent_returns"], maxlen=20)
    ppo.recent_success = deque(s.get("recent_success", []), maxlen=20)
    ppo.history = [tuple(x) for x in s["history"]]


__all__ = ["rollout_state", "restore_rollout_state"]
