"""Gymnasium environments as the "data" of an RL run: the vector-env DataModule, env ids and YAML wrappers,
the evaluation-episode loop, and checkpointing of environment state.

* :class:`GymEnvs`: a Gymnasium vector environment as a LightningDataModule; its ``spec``
  (:class:`~moeparadigms.benchmarks.specs.EnvSpec`) is what PPO builds its networks from.
* :func:`check_env_id`, :func:`wrapper_factory`, :func:`make_env`: ids (``module:EnvId`` too) and the
  ``wrappers`` of the YAML, checked when the config is read.
* :func:`play_episodes`: the greedy/sampled evaluation loop (validation/test episodes and ``moeparadigms evaluate``).
* :func:`capture_env_state` / :func:`restore_env_state` (with :func:`plain` / :func:`unplain`): an
  environment's state as checkpoint-safe plain data, so a resumed run continues its episodes exactly
  (classic control); ``None`` where the state is not plain data.

Importing this module registers the project's environments (``rl_envs``, ``metaworld``).
"""
from __future__ import annotations

import functools
import importlib
import numbers
from collections.abc import Callable
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ..checks import check_positive
from . import metaworld as _metaworld  # noqa: F401  (registers MetaWorldMT10; imports metaworld only when built)
from . import rl_envs  # noqa: F401  (registers the project's environments)
from .specs import EnvSpec


def describe_action_space(space: gym.Space) -> dict[str, Any]:
    """A Discrete or 1-D Box action space as plain data (what :class:`EnvSpec` and checkpoints hold)."""
    if isinstance(space, gym.spaces.Discrete):
        return {"kind": "discrete", "n": int(space.n)}
    if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
        return {"kind": "box", "dim": int(space.shape[0]), "low": space.low.tolist(), "high": space.high.tolist()}
    raise ValueError(f"action space {space} is not supported (Discrete or 1-D Box)")


def play_episodes(env: gym.Env, act: Callable[[np.ndarray], Any], episodes: int, *, seed: int) -> tuple[list[float], list[float]]:
    """Run ``episodes`` episodes of ``act`` (one observation -> one action), episode ``i`` reset with
    ``seed + i``. Returns the episode returns and, for environments that report ``info["is_success"]`` at the
    end, the successes (else an empty list)."""
    returns, successes = [], []
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        done, total, info = False, 0.0, {}
        while not done:
            obs, r, term, trunc, info = env.step(act(np.asarray(obs)))
            total, done = total + float(r), term or trunc
        returns.append(total)
        if "is_success" in info:
            successes.append(float(info["is_success"]))
    return returns, successes


def check_env_id(env_id: str) -> None:
    """A clear error for an id Gymnasium cannot make: not registered, or from a package that is not installed."""
    if not isinstance(env_id, str) or not env_id:
        raise ValueError(f"env_id must be a Gymnasium id such as 'CartPole-v1', got {env_id!r}")
    module, _, name = env_id.rpartition(":")
    if module:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"env_id={env_id!r}: the package {module!r} that registers it cannot be imported ({e}); "
                             f"install it (e.g. pip install {module.split('.')[0]})") from None
    try:
        gym.spec(name)
    except gym.error.Error as e:
        hint = ("" if module else "; an environment from another package is named 'package:EnvId' "
                "(e.g. 'minigrid:MiniGrid-Empty-5x5-v0') so that Gymnasium imports the package first")
        raise ValueError(f"env_id={env_id!r} is not a registered Gymnasium environment: {e}{hint}") from None


def wrapper_factory(spec: Any, index: int = 0) -> Any:
    """``{class_path, init_args}`` (YAML) -> a callable ``env -> wrapped env``; the class is imported here, so a
    typo or a missing package is reported when the config is read, not at the end of training."""
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ValueError(f"wrappers[{index}] must be {{class_path: 'package.module.Wrapper', init_args: {{...}}}}, "
                         f"got {spec!r}")
    unknown = set(spec) - {"class_path", "init_args"}
    if unknown:
        raise ValueError(f"wrappers[{index}] has unknown keys {sorted(unknown)}; allowed: class_path, init_args")
    module, _, name = spec["class_path"].rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"wrappers[{index}].class_path={spec['class_path']!r} cannot be imported: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, gym.Wrapper)):
        raise ValueError(f"wrappers[{index}].class_path={spec['class_path']!r} is not a gymnasium.Wrapper subclass")
    kwargs = dict(spec.get("init_args") or {})
    return functools.partial(cls, **kwargs)


def make_env(env_id: str, env_kwargs: dict | None = None, wrappers: list[dict] | None = None, **kwargs: Any) -> gym.Env:
    """``gym.make(env_id, **env_kwargs, **kwargs)`` with the YAML ``wrappers`` applied in order."""
    check_env_id(env_id)
    env = gym.make(env_id, **{**(env_kwargs or {}), **kwargs})
    for i, w in enumerate(wrappers or []):
        env = wrapper_factory(w, i)(env)
    return env


class _Updates(Dataset):
    """One item per PPO update: the rollout is collected inside ``training_step``."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class GymEnvs(pl.LightningDataModule):
    """A Gymnasium vector environment as the "data" of an RL run.

    Args:
        env_id: any registered Gymnasium id (``gymnasium.make_vec``), or Gymnasium's ``module:EnvId`` form for an
            environment an installed package registers on import (``minigrid:MiniGrid-Empty-5x5-v0``).
        num_envs: parallel environments.
        vectorization_mode: ``sync`` (one process; exact resume for classic control) or ``async``.
        env_kwargs: keyword arguments for ``gymnasium.make``.
        wrappers: wrappers applied in order to every environment, the training envs and the evaluation envs
            alike (``validate``/``test`` episodes, ``moeparadigms evaluate``), each ``{class_path: ...,
            init_args: {...}}``: e.g. ``minigrid.wrappers.ImgObsWrapper`` then
            ``gymnasium.wrappers.FlattenObservation`` to turn MiniGrid's dict/image observations into the
            1-D vector PPO takes.
        total_steps: the budget in environment steps (transitions; autoreset steps not counted): the run
            stops after the update that reaches it, and the learning rate anneals over it.
        seed: seeds the first ``reset``.
    """

    def __init__(self, *, env_id: str = "CartPole-v1", num_envs: int = 8, vectorization_mode: Literal["sync", "async"] = "sync",
                 env_kwargs: dict | None = None, wrappers: list[dict] | None = None, total_steps: int = 100_000,
                 seed: int = 0) -> None:
        super().__init__()
        check_env_id(env_id)
        self.wrapper_fns = [wrapper_factory(w, i) for i, w in enumerate(wrappers or [])]
        check_positive(num_envs=num_envs)
        if vectorization_mode not in ("sync", "async"):
            raise ValueError(f"vectorization_mode must be 'sync' or 'async', got {vectorization_mode!r}")
        self.save_hyperparameters()
        self.env_id, self.num_envs, self.mode = env_id, num_envs, vectorization_mode
        check_positive(total_steps=total_steps)
        self.env_kwargs, self.total_steps, self.seed = dict(env_kwargs or {}), total_steps, seed
        self.envs: Any = None

    def make(self) -> gym.vector.VectorEnv:
        envs = gym.make_vec(self.env_id, num_envs=self.num_envs, vectorization_mode=self.mode,
                            vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP},
                            wrappers=self.wrapper_fns or None, **self.env_kwargs)
        return gym.wrappers.vector.RecordEpisodeStatistics(envs, buffer_length=100)

    def make_single(self, **kwargs: Any) -> gym.Env:
        """One environment as the training envs see it (same kwargs and wrappers): for evaluation episodes."""
        return make_env(self.env_id, self.env_kwargs, self.hparams.get("wrappers"), **kwargs)

    def setup(self, stage: str | None = None) -> None:
        if self.envs is None:
            self.envs = self.make()

    @property
    def spec(self) -> EnvSpec:
        """What PPO builds from: observation width, action space, number of tasks (makes the envs if needed)."""
        self.setup()
        obs_space = self.envs.single_observation_space
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            raise ValueError(f"env_id={self.env_id!r}: observation space {type(obs_space).__name__}{getattr(obs_space, 'shape', '')} "
                             "is not a 1-D Box; add observation wrappers under data.init_args.wrappers, e.g. "
                             "[{class_path: minigrid.wrappers.ImgObsWrapper}, {class_path: gymnasium.wrappers.FlattenObservation}]")
        num_tasks = self.envs.metadata.get("num_tasks", 1)
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"env_id={self.env_id!r}: metadata['num_tasks'] must be an integer >= 1, got {num_tasks!r}")
        return EnvSpec(obs_dim=int(obs_space.shape[0]), action_spec=describe_action_space(self.envs.single_action_space),
                       num_tasks=num_tasks)

    def teardown(self, stage: str | None = None) -> None:
        if self.envs is not None:
            self.envs.close()
            self.envs = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Updates(self.total_steps), batch_size=None)  # more items than updates: PPO stops itself

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_Updates(1), batch_size=None)  # one item: PPO plays its evaluation episodes

    def test_dataloader(self) -> DataLoader:
        return DataLoader(_Updates(1), batch_size=None)


def plain(v: Any) -> Any:
    """numpy values as checkpoint-safe plain data (None when not plain)."""
    if isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
        return {"__ndarray__": torch.from_numpy(v.copy()), "dtype": str(v.dtype)}
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        return float(v)
    if v is None or isinstance(v, str):
        return v
    return None


def unplain(v: Any) -> Any:
    if isinstance(v, dict) and "__ndarray__" in v:
        return v["__ndarray__"].numpy().astype(v["dtype"])
    return v


_SKIP = {"spec", "metadata", "render_mode", "_np_random_seed", "screen", "clock", "isopen", "action_space",
         "observation_space", "_action_space", "_observation_space", "_metadata", "_cached_spec", "_disable_render_order_enforcing",
         "_saved_kwargs", "_previous_data"}  # constructor arguments and env-checker bookkeeping: not state


def capture_env_state(env: gym.Env) -> dict[str, Any] | None:
    """Plain-data state of one (wrapped) environment, or None if part of it is not plain data."""
    layers, e = [], env
    while True:
        state = {}
        for k, v in vars(e).items():
            if k in _SKIP or k == "env" or isinstance(v, gym.Space):
                continue
            if k == "_np_random":
                if v is not None:
                    s = v.bit_generator.state
                    state[k] = {"bit_generator": s["bit_generator"], "state": {kk: str(vv) for kk, vv in s["state"].items()},
                                "has_uint32": int(s["has_uint32"]), "uinteger": int(s["uinteger"])}
                continue
            p = plain(v)
            if p is None and v is not None:
                if isinstance(v, (int, float, bool, str)):
                    continue
                return None  # e.g. a Box2D world: not capturable
            state[k] = p
        layers.append(state)
        if not hasattr(e, "env"):
            break
        e = e.env
    return {"layers": layers}


def restore_env_state(env: gym.Env, state: dict[str, Any]) -> None:
    e = env
    for layer in state["layers"]:
        for k, v in layer.items():
            if k == "_np_random":
                rng = np.random.Generator(getattr(np.random, v["bit_generator"])())
                rng.bit_generator.state = {"bit_generator": v["bit_generator"], "state": {kk: int(vv) for kk, vv in v["state"].items()},
                                           "has_uint32": v["has_uint32"], "uinteger": v["uinteger"]}
                e._np_random = rng
            else:
                setattr(e, k, unplain(v))
        e = getattr(e, "env", e)


def capture_vector_state(envs: Any) -> dict[str, Any]:
    """What :class:`GymEnvs`' vector env (``RecordEpisodeStatistics`` around a ``SyncVectorEnv``) needs to continue
    exactly: its episode statistics, the autoreset flags and every sub-environment's state (``"envs"`` is None
    when some environment's state is not plain data, or the vector env is asynchronous). Plain data only."""
    vec = envs.env
    subs = [capture_env_state(e) for e in vec.envs] if hasattr(vec, "envs") else [None]
    return {
        "episode_stats": {k: plain(getattr(envs, k)) for k in ("episode_returns", "episode_lengths", "prev_dones")},
        "vector": {"_autoreset_envs": plain(getattr(vec, "_autoreset_envs", None))},
        "envs": subs if all(s is not None for s in subs) else None,
    }


def restore_vector_state(envs: Any, state: dict[str, Any], *, seed: int) -> bool:
    """Restore :func:`capture_vector_state`'s dict into a freshly built vector env (reset with ``seed`` first, as
    gymnasium requires before ``step``); False, restoring nothing, when the sub-environments' states were not
    captured."""
    vec = envs.env
    if state["envs"] is None or not hasattr(vec, "envs"):
        return False
    envs.reset(seed=seed)
    for e, st in zip(vec.envs, state["envs"], strict=True):
        restore_env_state(e, st)
    for k, v in state["episode_stats"].items():
        setattr(envs, k, unplain(v))
    if state["vector"]["_autoreset_envs"] is not None:
        # a gymnasium private (SyncVectorEnv keeps which sub-envs reset on the next step there; no public setter)
        vec._autoreset_envs = unplain(state["vector"]["_autoreset_envs"])
    return True


__all__ = ["GymEnvs", "capture_vector_state", "restore_vector_state", "check_env_id", "wrapper_factory", "make_env", "describe_action_space", "play_episodes",
           "capture_env_state", "restore_env_state", "plain", "unplain"]
