"""Gymnasium environments the project registers (``import moeparadigms.benchmarks.rl_envs``).

``moeparadigms/Identity-v0``: SB3's identity test as a Box-observation env: the observation is the one-hot
code of a random target in ``{0..n-1}``, the reward is 1 when the action equals it; ``ep_length`` steps per
episode. A correct PPO learns it to the maximum return in a few thousand steps.

``moeparadigms/CartPoleMT-v0``: a classic-control multi-task suite: CartPole-v1 with one of ``TASKS``' physics
(pole length and mass, gravity, force; task 3 reverses the push), drawn uniformly at each ``reset`` (or fixed
with ``task=``). The observation is CartPole's 4 features followed by the one-hot task id, and
``metadata["num_tasks"]`` says how many tasks there are (PPO reads both). 500 steps per episode, as CartPole-v1.

``moeparadigms/MiniGridMT3-v0`` / ``MT5`` / ``MT7``: MiniGrid multi-task suites in the spirit of MOORE's
(Hendawy et al. 2024) MT3/MT5/MT7 PPO benchmarks, built from the ``minigrid`` package (the env lists below are my
choice of small MiniGrid tasks after that paper, not checked against its code): one task drawn per episode,
the agent's 7x7x3 egocentric view flattened (``ImgObsWrapper``) followed by the one-hot task id, so an MLP
policy works. Success = positive episode return. The MiniGrid worlds are objects, not plain data: a resumed
run restarts their episodes (PPO warns).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.envs.classic_control.cartpole import CartPoleEnv


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


# (pole half-length, pole mass, gravity, force): why each is a different task: a longer, heavier pole falls
# slower but needs more force; a short pole reacts fast; low gravity changes the dynamics' time scale; the
# reversed push inverts the action meaning, so a shared policy without the task id cannot solve all four.
TASKS: tuple[tuple[float, float, float, float], ...] = (
    (0.5, 0.1, 9.8, 10.0),    # CartPole-v1
    (1.0, 0.5, 9.8, 15.0),    # long, heavy pole
    (0.25, 0.05, 9.8, 10.0),  # short, light pole
    (0.5, 0.1, 4.9, -10.0),   # low gravity, reversed push
)


class CartPoleMultiTask(CartPoleEnv):
    metadata = {**CartPoleEnv.metadata, "num_tasks": len(TASKS)}

    def __init__(self, task: int | None = None, render_mode: str | None = None) -> None:
        if task is not None and not 0 <= task < len(TASKS):
            raise ValueError(f"task={task!r} is out of range: CartPoleMT has tasks 0..{len(TASKS) - 1}")
        super().__init__(render_mode=render_mode)
        self.fixed_task, self.task = task, 0 if task is None else task
        low = np.concatenate([-self.observation_space.high, np.zeros(len(TASKS))]).astype(np.float32)
        high = np.concatenate([self.observation_space.high, np.ones(len(TASKS))]).astype(np.float32)
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)

    def _set_task(self, task: int) -> None:
        self.task = task
        self.length, self.masspole, self.gravity, self.force_mag = TASKS[task]
        self.total_mass = self.masspole + self.masscart
        self.polemass_length = self.masspole * self.length

    def _with_task(self, obs: np.ndarray) -> np.ndarray:
        return np.concatenate([obs, np.eye(len(TASKS), dtype=np.float32)[self.task]]).astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        gym.Env.reset(self, seed=seed)
        self._set_task(self.fixed_task if self.fixed_task is not None else int(self.np_random.integers(len(TASKS))))
        obs, info = super().reset(options=options)
        return self._with_task(obs), {**info, "task": self.task}

    def step(self, action):
        if self.force_mag < 0:  # CartPoleEnv pushes right for action 1 with +force_mag; keep its own check valid
            action = 1 - int(action)
            self.force_mag = -self.force_mag
            try:
                obs, r, term, trunc, info = super().step(action)
            finally:
                self.force_mag = -self.force_mag
        else:
            obs, r, term, trunc, info = super().step(action)
        return self._with_task(obs), r, term, trunc, {**info, "task": self.task}


MINIGRID_SUITES: dict[str, tuple[str, ...]] = {
    "MT3": ("MiniGrid-LavaGapS7-v0", "MiniGrid-RedBlueDoors-6x6-v0", "MiniGrid-MemoryS11-v0"),
    "MT5": ("MiniGrid-DoorKey-6x6-v0", "MiniGrid-LavaGapS7-v0", "MiniGrid-RedBlueDoors-6x6-v0", "MiniGrid-MemoryS11-v0",
            "MiniGrid-SimpleCrossingS9N1-v0"),
    "MT7": ("MiniGrid-DoorKey-6x6-v0", "MiniGrid-LavaGapS7-v0", "MiniGrid-RedBlueDoors-6x6-v0", "MiniGrid-MemoryS11-v0",
            "MiniGrid-SimpleCrossingS9N1-v0", "MiniGrid-MultiRoom-N2-S4-v0", "MiniGrid-Dynamic-Obstacles-6x6-v0"),
}


class MiniGridMultiTask(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, suite: str = "MT3", task: int | None = None, render_mode: str | None = None) -> None:
        if suite not in MINIGRID_SUITES:
            raise ValueError(f"suite={suite!r} is not a MiniGrid suite; choose one of {sorted(MINIGRID_SUITES)}")
        ids = MINIGRID_SUITES[suite]
        if task is not None and not 0 <= task < len(ids):
            raise ValueError(f"task={task!r} is out of range: {suite} has tasks 0..{len(ids) - 1}")
        import minigrid  # noqa: F401  (registers the MiniGrid ids)
        from minigrid.wrappers import ImgObsWrapper

        self.metadata = {**self.metadata, "num_tasks": len(ids)}
        self.render_mode = render_mode
        self.envs = [ImgObsWrapper(gym.make(i, render_mode=render_mode)) for i in ids]
        self.fixed_task, self.task = task, 0 if task is None else task
        view = int(np.prod(self.envs[0].observation_space.shape))
        high = np.concatenate([np.full(view, 255.0), np.ones(len(ids))]).astype(np.float32)
        self.observation_space = gym.spaces.Box(np.zeros_like(high), high, dtype=np.float32)
        self.action_space = gym.spaces.Discrete(7)  # every MiniGrid env: left, right, forward, pickup, drop, toggle, done

    def _with_task(self, img: np.ndarray) -> np.ndarray:
        return np.concatenate([img.reshape(-1).astype(np.float32), np.eye(len(self.envs), dtype=np.float32)[self.task]])

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.task = self.fixed_task if self.fixed_task is not None else int(self.np_random.integers(len(self.envs)))
        img, info = self.envs[self.task].reset(seed=int(self.np_random.integers(2**31)))
        return self._with_task(img), {**info, "task": self.task}

    def step(self, action):
        img, r, term, trunc, info = self.envs[self.task].step(int(action))
        return self._with_task(img), float(r), term, trunc, {**info, "task": self.task}

    def render(self):
        return self.envs[self.task].render()

    def close(self) -> None:
        for e in self.envs:
            e.close()


REGISTERED = {"moeparadigms/Identity-v0": "moeparadigms.benchmarks.rl_envs:IdentityEnv",
              "moeparadigms/CartPoleMT-v0": "moeparadigms.benchmarks.rl_envs:CartPoleMultiTask",
              **{f"moeparadigms/MiniGrid{k}-v0": "moeparadigms.benchmarks.rl_envs:MiniGridMultiTask" for k in MINIGRID_SUITES}}
_LIMITS = {"moeparadigms/CartPoleMT-v0": 500}
_KWARGS = {f"moeparadigms/MiniGrid{k}-v0": {"suite": k} for k in MINIGRID_SUITES}
for _id, _entry in REGISTERED.items():
    if _id not in gym.registry:
        gym.register(_id, entry_point=_entry, max_episode_steps=_LIMITS.get(_id), kwargs=_KWARGS.get(_id, {}))
