"""Gymnasium environments the project registers (``import moeparadigms.benchmarks.rl_envs``).

``moeparadigms/Identity-v0``: SB3's identity test as a Box-observation env: the observation is the one-hot
code of a random target in ``{0..n-1}``, the reward is 1 when the action equals it; ``ep_length`` steps per
episode. A correct PPO learns it to the maximum return in a few thousand steps.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np


class IdentityEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, n: int = 2, ep_length: int = 10) -> None:
        if n < 2 or ep_length < 1:
            raise ValueError(f"IdentityEnv needs n >= 2 and ep_length >= 1, got n={n}, ep_length={ep_length}")
        self.n, self.ep_length = n, ep_length
        self.observation_space = gym.spaces.Box(0.0, 1.0, (n,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(n)
        self.target, self.t = 0, 0

    def _obs(self) -> np.ndarray:
        o = np.zeros(self.n, dtype=np.float32)
        o[self.target] = 1.0
        return o

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t, self.target = 0, int(self.np_random.integers(self.n))
        return self._obs(), {}

    def step(self, action):
        reward = float(int(action) == self.target)
        self.t += 1
        self.target = int(self.np_random.integers(self.n))
        return self._obs(), reward, False, self.t >= self.ep_length, {}


REGISTERED = {"moeparadigms/Identity-v0": "moeparadigms.benchmarks.rl_envs:IdentityEnv"}
for _id, _entry in REGISTERED.items():
    if _id not in gym.registry:
        gym.register(_id, entry_point=_entry)
