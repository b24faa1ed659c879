"""Meta-World MT10 as a multi-task Gymnasium environment (optional: ``pip install 'moeparadigms[metaworld]'``).

``moeparadigms/MetaWorldMT10-v0`` (registered when this module is imported; ``metaworld`` itself is imported
only when the environment is built, so this module imports without it): the ten MT10 manipulation tasks of
Meta-World >= 3 (Yu et al. 2019; ``metaworld.MT10``: reach, push, pick-place, door-open, drawer-open,
drawer-close, button-press-topdown, peg-insert-side, window-open, window-close, in ``TASKS`` order), one task
drawn uniformly at each ``reset`` together with one of that task's 50 train variations (object and goal
positions), or fixed with ``task=`` / ``reset(options={"task": i})``.

- observation (float32 Box, 49-d): Meta-World's 39-d MT state (hand, gripper, objects, the previous frame,
  the goal: MT benchmarks show the goal) followed by the one-hot task id; ``metadata["num_tasks"] = 10``
  (PPO reads both, as for ``moeparadigms/CartPoleMT-v0``);
- action: Meta-World's 4-d continuous Box in [-1, 1] (end-effector xyz displacement, gripper);
- reward: Meta-World's dense v2 reward (0..10 per step); episodes are truncated at 500 steps (Meta-World's
  ``max_path_length``) and never terminate;
- ``info["success"]``: Meta-World's per-step success (0.0/1.0); ``info["is_success"]``: 1.0 once the
  episode has succeeded at any step (Meta-World's own evaluation counts an episode a success if it reaches
  success at any step; the key is SB3's, whose loggers read it at the end of an episode); ``info["task"]``.

Seeding: ``reset(seed=s)`` fixes the sequence of tasks and variations drawn from then on; the 50
variations per task themselves are ``metaworld.MT10(seed=benchmark_seed)``'s (default 0), generated once per
process (~5 s) and shared by every instance. Each instance holds the ten MuJoCo envs (~1 s, ~210 MB).
The MuJoCo state is not plain data: a resumed PPO run restarts its episodes (PPO warns).
"""

from __future__ import annotations

import functools
from typing import Any

import gymnasium as gym
import numpy as np

ENV_ID = "moeparadigms/MetaWorldMT10-v0"
TASKS: tuple[str, ...] = ("reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
                          "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3")
MAX_EPISODE_STEPS = 500  # Meta-World's max_path_length
INSTALL_HINT = "pip install 'moeparadigms[metaworld]'"


def _import_metaworld() -> Any:
    """The ``metaworld`` package (>= 3), or an ImportError that says how to install it."""
    try:
        import metaworld
    except ImportError as e:
        raise ImportError(f"{ENV_ID} needs Meta-World (metaworld>=3.0 with its pinned mujoco), which could not be imported "
                          f"({e}). Install it with: {INSTALL_HINT}") from e
    if not hasattr(metaworld, "MT10"):
        raise ImportError(f"{ENV_ID}: the installed metaworld has no MT10 benchmark; install metaworld>=3.0 with {INSTALL_HINT}")
    try:
        from importlib.metadata import version

        major = int(version("metaworld").split(".")[0])
    except Exception:  # an unpackaged checkout: trust the API check above and the task names below
        major = 3
    if major < 3:
        raise ImportError(f"{ENV_ID} needs metaworld>=3.0 (its -v3 tasks), found {version('metaworld')}: {INSTALL_HINT}")
    return metaworld


@functools.lru_cache(maxsize=4)
def _benchmark(seed: int) -> Any:
    """``metaworld.MT10(seed)`` (its 50 train variations per task), built once per process and seed."""
    bench = _import_metaworld().MT10(seed=seed)
    missing = [t for t in TASKS if t not in bench.train_classes]
    if missing:
        raise ImportError(f"{ENV_ID}: the installed metaworld's MT10 lacks {missing}; install metaworld>=3.0 with {INSTALL_HINT}")
    return bench


class MetaWorldMT10(gym.Env):
    metadata = {"render_modes": ["rgb_array", "depth_array"], "render_fps": 80, "num_tasks": len(TASKS)}

    def __init__(self, task: int | None = None, benchmark_seed: int = 0, render_mode: str | None = None,
                 camera_name: str | None = None, width: int = 480, height: int = 480) -> None:
        if task is not None and not (isinstance(task, (int, np.integer)) and 0 <= task < len(TASKS)):
            raise ValueError(f"task={task!r} is out of range: MetaWorldMT10 has tasks 0..{len(TASKS) - 1}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode={render_mode!r} is not supported; choose one of {self.metadata['render_modes']}")
        bench = _benchmark(int(benchmark_seed))
        self.metadata = {**type(self).metadata}  # per instance: the vector env writes into it
        self.render_mode = render_mode
        self.fixed_task, self.task, self.variation = task, 0 if task is None else int(task), 0
        self.variations = [[t for t in bench.train_tasks if t.env_name == name] for name in TASKS]
        self.envs = []
        for name, variations in zip(TASKS, self.variations):
            env = bench.train_classes[name](render_mode=render_mode, camera_name=camera_name, width=width, height=height)
            env.set_task(variations[0])  # MT: the goal is observed; fixes the observation space
            self.envs.append(env)
        # the union of the ten tasks' bounds (their goal spaces differ), then the one-hot task id
        low = np.min([e.sawyer_observation_space.low for e in self.envs], axis=0)
        high = np.max([e.sawyer_observation_space.high for e in self.envs], axis=0)
        self.state_dim = low.shape[0]
        low = np.concatenate([low, np.zeros(len(TASKS))]).astype(np.float32)
        high = np.concatenate([high, np.ones(len(TASKS))]).astype(np.float32)
        self.observation_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (4,), dtype=np.float32)
        self.episode_success = False

    def _obs(self, state: np.ndarray) -> np.ndarray:
        obs = np.concatenate([np.asarray(state, dtype=np.float32), np.eye(len(TASKS), dtype=np.float32)[self.task]])
        return np.clip(obs, self.observation_space.low, self.observation_space.high)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:  # the MuJoCo envs' own generators (unused by MT's fixed variations, seeded all the same)
            for e, s in zip(self.envs, self.np_random.integers(2**31, size=len(self.envs))):
                e.seed(int(s))
        task = (options or {}).get("task", self.fixed_task)
        if task is not None and not 0 <= int(task) < len(TASKS):
            raise ValueError(f"options['task']={task!r} is out of range: MetaWorldMT10 has tasks 0..{len(TASKS) - 1}")
        self.task = int(task) if task is not None else int(self.np_random.integers(len(TASKS)))
        self.variation = int(self.np_random.integers(len(self.variations[self.task])))
        env = self.envs[self.task]
        env.set_task(self.variations[self.task][self.variation])
        state, info = env.reset()
        self.episode_success = False
        return self._obs(state), {**info, "task": self.task, "variation": self.variation}

    def step(self, action):
        state, reward, terminated, truncated, info = self.envs[self.task].step(np.asarray(action, dtype=np.float32))
        success = float(info.get("success", 0.0))
        self.episode_success = self.episode_success or success > 0
        info = {**info, "success": success, "is_success": float(self.episode_success), "task": self.task}
        return self._obs(state), float(reward), bool(terminated), bool(truncated), info

    def render(self):
        return self.envs[self.task].render()

    def close(self) -> None:
        for e in getattr(self, "envs", []):
            e.close()
        self.envs = []


if ENV_ID not in gym.registry:
    gym.register(ENV_ID, entry_point="moeparadigms.benchmarks.metaworld:MetaWorldMT10", max_episode_steps=MAX_EPISODE_STEPS)
