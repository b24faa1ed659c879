"""PPO with dense, top-k MoE or Soft MoE actor-critics on Gymnasium vector environments.

One Lightning ``training_step`` = one PPO update: collect ``num_steps`` steps from every environment of the
vector env (``GymEnvs``, the DataModule), compute GAE advantages, run ``update_epochs`` epochs of clipped
policy/value minibatch updates (cleanrl's ``ppo.py`` / SB3 ``PPO`` semantics: clipped objective, clipped
value loss, entropy bonus, advantage normalisation, linear learning-rate annealing, gradient clipping).

Gymnasium >= 1.0 autoreset (``AutoresetMode.NEXT_STEP``): the step after an episode ends is a *reset step*:
its action is ignored and it returns the first observation of the next episode. Such transitions are
masked out of GAE and the losses (``valid``). On truncation the observation returned with
``truncated=True`` is the real final observation, so its value bootstraps the return; on termination
nothing is bootstrapped.

Networks (``network``): ``dense`` (two tanh layers, separate actor and critic, as SB3's default MlpPolicy),
``moe`` (the penultimate layer is a residual MoE block built from the ``moe`` given in YAML, as in
Obando-Ceron et al. 2024; the critic gets an independent copy) and ``soft_moe`` (the same with a
``SoftMoERouter``). MoE auxiliary losses are added to the loss and the expert load is logged.

Everything the next update depends on is in the checkpoint, so a run killed and resumed from it continues
exactly: weights, optimizer, observation-normalisation statistics, the current observations, the torch
RNG, episode statistics and, for environments whose state is plain data (classic control), every
sub-environment's state and RNG. Other environments restart their episodes on resume, with a warning.

Shape legend: S rollout steps, N environments, B minibatch, O observation features, A action dims.
"""
from __future__ import annotations

import copy
import functools
import importlib
import math
import numbers
import warnings
from collections import deque
from pathlib import Path
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.distributions import Categorical, Normal
from torch.utils.data import DataLoader, Dataset

from ..benchmarks import metaworld as _metaworld  # noqa: F401  (registers MetaWorldMT10; imports metaworld only when built)
from ..benchmarks import rl_envs  # noqa: F401  (registers the project's environments)
from ..checkpoint import check_compatible, hparams_ignore, store_module_configs
from ..core import MoE, SoftMoERouter, TaskConditionedRouter
from ..core.experts import _reset
from ..nets import MoEBlock

NETWORKS = ("dense", "moe", "soft_moe")


# ---------------------------------------------------------------------------------------------- envs
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
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
        if vectorization_mode not in ("sync", "async"):
            raise ValueError(f"vectorization_mode must be 'sync' or 'async', got {vectorization_mode!r}")
        self.save_hyperparameters()
        self.env_id, self.num_envs, self.mode = env_id, num_envs, vectorization_mode
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
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


def _plain(v: Any) -> Any:
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


def _unplain(v: Any) -> Any:
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
            p = _plain(v)
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
                setattr(e, k, _unplain(v))
        e = getattr(e, "env", e)


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
    """``obs -> tanh(Linear) -> [tanh(Linear) | MoEBlock] -> head``; returns (output, MoE aux loss, stats).

    ``num_heads > 1``: one output head per task, the row of ``task_id`` is used (multi-task RL). A
    ``TaskConditionedRouter`` in the MoE block routes on ``task_id`` too."""

    def __init__(self, obs_dim: int, out_dim: int, hidden: int, moe: MoE | None, head_gain: float, num_heads: int = 1) -> None:
        super().__init__()
        self.inp = nn.Linear(obs_dim, hidden)
        self.block = MoEBlock(moe) if moe is not None else None
        self.mid = None if moe is not None else nn.Linear(hidden, hidden)
        self.num_heads, self.out_dim = num_heads, out_dim
        self.head = nn.Linear(hidden, out_dim * num_heads)
        self.task_routed = moe is not None and isinstance(moe.router, TaskConditionedRouter)
        for lin in (self.inp, self.mid):
            if lin is not None:
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
        h = torch.tanh(self.inp(x))
        if self.block is None:
            return self._head(torch.tanh(self.mid(h)), task_id), h.new_zeros(()), None
        if isinstance(self.block.moe.router, SoftMoERouter):
            # Soft MoE mixes the tokens of a sequence: each sample's features are its own sequence of
            # hidden / d_model tokens, so one environment's action never depends on another's observation
            out = self.block(h.view(*h.shape[:-1], -1, self.block.moe.d_model))
            return self._head(out.y.flatten(-2), task_id), out.aux_loss, out.stats
        out = self.block(h, task_id=task_id if self.task_routed else None)
        return self._head(out.y, task_id), out.aux_loss, out.stats


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


# ---------------------------------------------------------------------------------------------- PPO
class PPO(pl.LightningModule):
    """PPO (Schulman et al. 2017) with an MoE-capable actor-critic; defaults follow SB3's zoo for CartPole-v1.

    Args:
        network: ``dense``, ``moe`` or ``soft_moe`` (the latter two need ``moe``; with ``moe`` its ``d_model``
            equals ``hidden``; ``soft_moe`` needs a ``SoftMoERouter`` and splits each sample's hidden features
            into ``hidden / d_model`` tokens).
        moe: the actor's MoE (the critic gets an independent, re-initialised copy).
        hidden: width of the hidden layers.
        num_steps: rollout length per environment per update.
        gamma, gae_lambda: discount and GAE lambda.
        update_epochs, minibatch_size: PPO epochs per update and minibatch size.
        clip_coef, clip_vloss: policy clip range; clip the value loss too (at ``clip_coef``, never annealed).
        ent_coef, vf_coef, max_grad_norm: loss weights and gradient clipping.
        lr, anneal_lr: Adam learning rate, annealed linearly to 0 over the run's environment steps (SB3's
            ``lr * progress_remaining``, progress taken after each rollout as SB3 does).
        anneal_clip: anneal ``clip_coef`` the same way (the SB3 zoo's ``lin_0.2`` clip range, CartPole).
        norm_adv, norm_obs: normalise advantages per minibatch; observations with running statistics.
        norm_reward: scale rewards by the running standard deviation of the discounted return (SB3's
            ``VecNormalize(norm_reward=True)``; clipped to +-10). Logged returns stay unscaled.
        torch_threads: intra-op threads (small policies run fastest with 1 on CPU).
        eval_episodes: greedy-policy episodes per validation/test (``val/return``, ``test/return``), on a
            separate environment seeded from the DataModule's seed.
        plots: write the learning curve (episode returns against environment steps) as
            ``learning_curve.png`` in the log directory at the end of fit.
        task_heads: one actor head and one critic head per task (multi-task RL).

    Multi-task environments declare ``metadata["num_tasks"] = T`` and end their observation with the one-hot
    task id (``moeparadigms/CartPoleMT-v0``); single-task environments are one task. The task id picks the
    head (``task_heads``) and enters routing when the MoE's router is a ``TaskConditionedRouter``, whose
    ``num_tasks`` must cover the environment's. Environments that report ``info["is_success"]`` at the end of
    an episode (``moeparadigms/MetaWorldMT10-v0``) also get ``train/success_rate`` (last 20 episodes) and
    ``val/success_rate`` / ``test/success_rate``.
    """

    def __init__(
        self,
        *,
        network: Literal["dense", "moe", "soft_moe"] = "dense",
        moe: MoE | None = None,
        hidden: int = 64,
        num_steps: int = 32,
        gamma: float = 0.98,
        gae_lambda: float = 0.8,
        update_epochs: int = 20,
        minibatch_size: int = 256,
        clip_coef: float = 0.2,
        clip_vloss: bool = False,
        ent_coef: float = 0.0,
        vf_coef: float = 0.5,
        max_grad_norm: float = 0.5,
        lr: float = 1e-3,
        anneal_lr: bool = True,
        anneal_clip: bool = False,
        norm_adv: bool = True,
        norm_obs: bool = False,
        norm_reward: bool = False,
        torch_threads: int | None = 1,
        eval_episodes: int = 5,
        plots: bool = True,
        task_heads: bool = False,
    ) -> None:
        super().__init__()
        if network not in NETWORKS:
            raise ValueError(f"network={network!r} is not supported; choose one of {list(NETWORKS)}")
        if network == "dense" and moe is not None:
            raise ValueError("network='dense' takes no moe; use network='moe' or 'soft_moe'")
        if network != "dense":
            if moe is None:
                raise ValueError(f"network={network!r} needs moe (a moeparadigms.core.MoE)")
            if network == "moe" and moe.d_model != hidden:
                raise ValueError(f"moe.d_model={moe.d_model} must equal hidden={hidden}")
            if network == "soft_moe" and hidden % moe.d_model:
                raise ValueError(f"soft_moe splits the hidden features into tokens of moe.d_model: hidden={hidden} "
                                 f"must be a multiple of moe.d_model={moe.d_model}")
            if (network == "soft_moe") != isinstance(moe.router, SoftMoERouter):
                raise ValueError(f"network={network!r} but moe.router is {type(moe.router).__name__}: soft_moe needs a "
                                 "SoftMoERouter and moe a token-choice router")
        for name, v in dict(hidden=hidden, num_steps=num_steps, update_epochs=update_epochs, minibatch_size=minibatch_size).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        for name, v, lo, hi in (("gamma", gamma, 0, 1), ("gae_lambda", gae_lambda, 0, 1)):
            if not lo <= v <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {v!r}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        self.save_hyperparameters(ignore=hparams_ignore("moe"))
        store_module_configs(self, moe=moe)  # a Python-built policy reloads from its checkpoint alone
        self.moe = moe
        self.automatic_optimization = False
        self.built = False
        self.clip = clip_coef  # the clip range of the current update (annealed with anneal_clip)
        self.recent_returns: deque[float] = deque(maxlen=20)
        self.recent_success: deque[float] = deque(maxlen=20)  # environments that report info['is_success']
        self.history: list[tuple[int, float, int]] = []  # (env steps, episode return, task id)

    # ------------------------------------------------------------------ building from the env
    def build(self, obs_dim: int, action_space: dict[str, Any], num_tasks: int = 1) -> None:
        if self.built:
            return
        h = self.hparams
        router = None if self.moe is None else self.moe.router
        if isinstance(router, TaskConditionedRouter) and num_tasks > router.num_tasks:
            raise ValueError(f"the environment has num_tasks={num_tasks} but moe.router.num_tasks={router.num_tasks}: "
                             f"task ids up to {num_tasks - 1} would be out of range")
        if num_tasks > 1 and obs_dim <= num_tasks:
            raise ValueError(f"num_tasks={num_tasks} needs observations that end with a one-hot task id; got obs_dim={obs_dim}")
        self.obs_dim, self.action_spec, self.num_tasks = obs_dim, action_space, num_tasks
        discrete = action_space["kind"] == "discrete"
        act_out = action_space["n"] if discrete else action_space["dim"]
        moe_a = self.moe
        moe_c = None if moe_a is None else _reset(copy.deepcopy(moe_a))
        self.moe = None  # owned by the actor from here on
        heads = num_tasks if h.task_heads else 1
        self.actor = PolicyNet(obs_dim, act_out, h.hidden, moe_a, head_gain=0.01, num_heads=heads)
        self.critic = PolicyNet(obs_dim, 1, h.hidden, moe_c, head_gain=1.0, num_heads=heads)
        self.log_std = None if discrete else nn.Parameter(torch.zeros(act_out))
        self.obs_rms = RunningMeanStd((obs_dim,))
        self.ret_rms = RunningMeanStd(())
        self.disc_return = torch.zeros(0)  # per-env discounted return for norm_reward (in the rollout state)
        self.register_buffer("env_steps", torch.zeros((), dtype=torch.long))
        self.built = True

    @staticmethod
    def describe_action_space(space: gym.Space) -> dict[str, Any]:
        if isinstance(space, gym.spaces.Discrete):
            return {"kind": "discrete", "n": int(space.n)}
        if isinstance(space, gym.spaces.Box) and len(space.shape) == 1:
            return {"kind": "box", "dim": int(space.shape[0]), "low": space.low.tolist(), "high": space.high.tolist()}
        raise ValueError(f"action space {space} is not supported (Discrete or 1-D Box)")

    def setup(self, stage: str) -> None:
        if self.hparams.torch_threads:
            torch.set_num_threads(self.hparams.torch_threads)
        dm = self.trainer.datamodule
        if not isinstance(dm, GymEnvs):
            raise TypeError(f"PPO needs a GymEnvs DataModule, got {type(dm).__name__}")
        dm.setup(stage)
        obs_space = dm.envs.single_observation_space
        if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
            raise ValueError(f"env_id={dm.env_id!r}: observation space {type(obs_space).__name__}{getattr(obs_space, 'shape', '')} "
                             "is not a 1-D Box; add observation wrappers under data.init_args.wrappers, e.g. "
                             "[{class_path: minigrid.wrappers.ImgObsWrapper}, {class_path: gymnasium.wrappers.FlattenObservation}]")
        num_tasks = dm.envs.metadata.get("num_tasks", 1)
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"env_id={dm.env_id!r}: metadata['num_tasks'] must be an integer >= 1, got {num_tasks!r}")
        self.build(int(obs_space.shape[0]), self.describe_action_space(dm.envs.single_action_space), num_tasks)

    # ------------------------------------------------------------------ acting
    def task_of(self, raw_obs: Tensor) -> Tensor | None:
        """Task ids ``[N]`` from the one-hot tail of raw observations ``[N, O]``; a single-task environment is
        task 0 for a task-routed network and has no ids otherwise (None)."""
        if self.num_tasks > 1:
            return raw_obs[:, -self.num_tasks :].argmax(-1)
        return torch.zeros(raw_obs.shape[0], dtype=torch.long) if self.actor.task_routed else None

    def _dist(self, obs: Tensor, task: Tensor | None = None) -> tuple[Any, Tensor, Any]:
        out, aux, stats = self.actor(obs, task)
        # validate_args=False: the argument checks cost ~3% of a small policy's update and the inputs are ours
        if self.action_spec["kind"] == "discrete":
            return Categorical(logits=out, validate_args=False), aux, stats
        return Normal(out, self.log_std.exp().expand_as(out), validate_args=False), aux, stats

    def value(self, obs: Tensor, task: Tensor | None = None) -> tuple[Tensor, Tensor]:
        v, aux, _ = self.critic(obs, task)
        return v.squeeze(-1), aux

    @torch.no_grad()
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        """Actions for raw observations ``[N, O]`` (normalised inside): the policy ``moeparadigms evaluate`` runs."""
        raw = torch.as_tensor(obs, dtype=torch.float32)
        dist, _, _ = self._dist(self._obs(raw), self.task_of(raw))
        a = (dist.probs.argmax(-1) if self.action_spec["kind"] == "discrete" else dist.mean) if deterministic else dist.sample()
        return self._env_action(a)

    def _obs(self, obs: Tensor) -> Tensor:
        return self.obs_rms(obs) if self.hparams.norm_obs else obs

    def _env_action(self, a: Tensor) -> np.ndarray:
        if self.action_spec["kind"] == "discrete":
            return a.cpu().numpy()
        lo, hi = np.asarray(self.action_spec["low"]), np.asarray(self.action_spec["high"])
        return np.clip(a.cpu().numpy(), lo, hi)

    # ------------------------------------------------------------------ one PPO update per training step
    def on_train_start(self) -> None:
        envs = self.trainer.datamodule.envs
        if getattr(self, "_resume_state", None) is not None:
            self._restore_rollout_state(envs, self._resume_state)
            self._resume_state = None
        else:
            obs, _ = envs.reset(seed=self.trainer.datamodule.seed)
            self.next_obs = torch.as_tensor(obs, dtype=torch.float32)
            self.next_autoreset = torch.zeros(envs.num_envs)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        h = self.hparams
        opt = self.optimizers()
        total = self.trainer.datamodule.total_steps
        r = self.collect_rollout(self.trainer.datamodule.envs)
        frac = max(0.0, 1.0 - int(self.env_steps) / total)  # SB3's progress_remaining, after the rollout
        if h.anneal_lr:
            for g in opt.param_groups:
                g["lr"] = frac * h.lr
        self.clip = h.clip_coef * frac if h.anneal_clip else h.clip_coef
        self.update(r, opt)
        if int(self.env_steps) >= total:
            self.trainer.should_stop = True

    def collect_rollout(self, envs: Any) -> dict[str, Tensor]:
        """``num_steps`` steps of every environment: buffers ``[S, N, ...]`` with GAE advantages and returns."""
        h = self.hparams
        N, S = envs.num_envs, h.num_steps
        obs_buf = torch.zeros(S, N, self.obs_dim)
        act_buf = torch.zeros((S, N) if self.action_spec["kind"] == "discrete" else (S, N, self.action_spec["dim"]))
        logp_buf, val_buf, rew_buf = torch.zeros(S, N), torch.zeros(S, N), torch.zeros(S, N)
        term_buf, trunc_buf, valid_buf = torch.zeros(S, N), torch.zeros(S, N), torch.zeros(S, N)
        task_buf = torch.zeros(S, N, dtype=torch.long)
        with torch.inference_mode():
            for t in range(S):
                valid_buf[t] = 1.0 - self.next_autoreset
                if h.norm_obs:
                    keep = valid_buf[t].bool()
                    if keep.any():
                        self.obs_rms.update(self.next_obs[keep])
                x, task = self._obs(self.next_obs), self.task_of(self.next_obs)
                obs_buf[t] = x
                if task is not None:
                    task_buf[t] = task
                dist, _, _ = self._dist(x, task)
                a = dist.sample()
                logp = dist.log_prob(a)
                logp_buf[t] = logp if logp.dim() == 1 else logp.sum(-1)
                val_buf[t] = self.value(x, task)[0]
                act_buf[t] = a
                obs, rew, term, trunc, info = envs.step(self._env_action(a))
                rew_buf[t] = torch.as_tensor(rew, dtype=torch.float32)
                if h.norm_reward:
                    if self.disc_return.numel() != N:
                        self.disc_return = torch.zeros(N)
                    self.disc_return.mul_(h.gamma).add_(rew_buf[t] * valid_buf[t])
                    if valid_buf[t].any():
                        self.ret_rms.update(self.disc_return[valid_buf[t].bool()].double())
                    rew_buf[t] = (rew_buf[t] / (self.ret_rms.var + 1e-8).sqrt()).clamp(-10, 10).float()
                    self.disc_return[torch.as_tensor(term | trunc)] = 0.0
                term_buf[t] = torch.as_tensor(term, dtype=torch.float32)
                trunc_buf[t] = torch.as_tensor(trunc, dtype=torch.float32)
                self.next_obs = torch.as_tensor(obs, dtype=torch.float32)
                self.next_autoreset = ((term_buf[t] + trunc_buf[t]) > 0).float()
                self.env_steps += int(valid_buf[t].sum())
                if "episode" in info:
                    for i in np.nonzero(info["_episode"])[0]:
                        r = float(info["episode"]["r"][i])
                        self.recent_returns.append(r)
                        if "is_success" in info and info["_is_success"][i]:  # e.g. Meta-World: success at any step
                            self.recent_success.append(float(info["is_success"][i]))
                        self.history.append((int(self.env_steps), r, 0 if task is None else int(task[i])))
            next_value = self.value(self._obs(self.next_obs), self.task_of(self.next_obs))[0]
        adv, ret = gae(rew_buf, val_buf, next_value, term_buf, trunc_buf, valid_buf, h.gamma, h.gae_lambda)
        return {"obs": obs_buf, "actions": act_buf, "logp": logp_buf, "values": val_buf, "rewards": rew_buf,
                "terminated": term_buf, "truncated": trunc_buf, "valid": valid_buf, "advantages": adv, "returns": ret,
                "tasks": task_buf}

    def update(self, r: dict[str, Tensor], opt: Any) -> None:
        """PPO epochs of clipped minibatch updates on the rollout's valid transitions."""
        h = self.hparams
        keep = r["valid"].flatten().bool()
        b_obs, b_act = r["obs"].flatten(0, 1)[keep], r["actions"].flatten(0, 1)[keep]
        b_logp, b_adv, b_ret, b_val = (r[k].flatten()[keep] for k in ("logp", "advantages", "returns", "values"))
        b_task = r["tasks"].flatten()[keep] if self.num_tasks > 1 or self.actor.task_routed else None
        n = b_obs.shape[0]
        stats = {"loss": 0.0, "pg": 0.0, "v": 0.0, "ent": 0.0, "aux": 0.0, "clipfrac": 0.0}
        count = 0
        for _ in range(h.update_epochs):
            perm = torch.randperm(n)
            for s in range(0, n, h.minibatch_size):
                mb = perm[s : s + h.minibatch_size]
                t_mb = None if b_task is None else b_task[mb]
                dist, aux_a, _ = self._dist(b_obs[mb], t_mb)
                logp = dist.log_prob(b_act[mb])
                logp = logp if logp.dim() == 1 else logp.sum(-1)
                ent = dist.entropy()
                ent = ent if ent.dim() == 1 else ent.sum(-1)
                ratio = (logp - b_logp[mb]).exp()
                a = b_adv[mb]
                if h.norm_adv and a.numel() > 1:
                    a = (a - a.mean()) / (a.std() + 1e-8)
                pg = torch.max(-a * ratio, -a * ratio.clamp(1 - self.clip, 1 + self.clip)).mean()
                v, aux_c = self.value(b_obs[mb], t_mb)
                if h.clip_vloss:
                    v_clip = b_val[mb] + (v - b_val[mb]).clamp(-h.clip_coef, h.clip_coef)
                    v_loss = 0.5 * torch.max((v - b_ret[mb]).square(), (v_clip - b_ret[mb]).square()).mean()
                else:
                    v_loss = 0.5 * (v - b_ret[mb]).square().mean()
                loss = pg - h.ent_coef * ent.mean() + h.vf_coef * 2 * v_loss + aux_a + aux_c  # SB3: vf_coef * MSE
                opt.zero_grad()
                self.manual_backward(loss)
                if h.max_grad_norm:
                    self.clip_gradients(opt, gradient_clip_val=h.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                with torch.no_grad():
                    stats["loss"] += float(loss)
                    stats["pg"] += float(pg)
                    stats["v"] += float(v_loss)
                    stats["ent"] += float(ent.mean())
                    stats["aux"] += float(aux_a + aux_c)
                    stats["clipfrac"] += float(((ratio - 1).abs() > self.clip).float().mean())
                count += 1
        logs = {f"train/{k}": v / max(count, 1) for k, v in stats.items()}
        logs["train/env_steps"] = float(self.env_steps)
        logs["train/clip_range"] = self.clip
        if self.recent_returns:
            logs["train/episode_return"] = float(np.mean(self.recent_returns))
        if self.recent_success:
            logs["train/success_rate"] = float(np.mean(self.recent_success))
        if self.num_tasks > 1:  # per-task curves: the mean of each task's last 20 episodes
            for t in range(self.num_tasks):
                rets = [r for _, r, task in self.history[-20 * self.num_tasks * 4:] if task == t][-20:]
                if rets:
                    logs[f"train/episode_return/task_{t}"] = float(np.mean(rets))
        self.log_dict(logs, prog_bar=False)
        self._log_against_env_steps(logs)
        if self.recent_returns:
            self.log("return", logs["train/episode_return"], prog_bar=True)
        if self.actor.block is not None:
            with torch.no_grad():
                m = min(n, 1024)
                load = self.actor(b_obs[:m], None if b_task is None else b_task[:m])[2].tokens_per_expert.double()
            self.log("train/actor_max_load", float(load.max() / load.mean().clamp_min(1e-9)))

    def _log_against_env_steps(self, logs: dict[str, float]) -> None:
        """The learning curves again with environment steps as the x axis (``env_steps/...`` in TensorBoard and
        in the CSV's ``step`` column), the axis RL results are compared on; ``train/...`` is per update."""
        curves = {k.replace("train/", "env_steps/", 1): v for k, v in logs.items()
                  if k.startswith(("train/episode_return", "train/success_rate"))}
        if curves and self.trainer is not None and self.trainer.is_global_zero and not self.trainer.fast_dev_run:
            for lg in self.loggers:
                lg.log_metrics(curves, step=int(self.env_steps))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # fused: one kernel for all parameters; on CPU 2.3x faster per step than the per-tensor loop for a 64-64 MLP
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, eps=1e-5, fused=True)

    def on_fit_end(self) -> None:
        log_dir = self.trainer.log_dir  # a collective under DDP: every rank asks
        if not self.hparams.plots or not self.history or not self.trainer.is_global_zero or not log_dir:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, rets = np.array([h[0] for h in self.history]), np.array([h[1] for h in self.history])
        smooth = np.array([rets[max(0, i - 19) : i + 1].mean() for i in range(len(rets))])
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.plot(steps, rets, ".", ms=2, alpha=0.3, label="episode return")
        ax.plot(steps, smooth, label="mean of last 20")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("return")
        ax.set_title(f"{self.trainer.datamodule.env_id}: PPO ({self.hparams.network})", fontsize=9)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(log_dir) / "learning_curve.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        self.plot_paths = [path]

    # ------------------------------------------------------------------ validation / test: greedy episodes
    def _play(self, stage: str) -> None:
        dm = self.trainer.datamodule
        env = dm.make_single()
        returns, successes = [], []
        for ep in range(self.hparams.eval_episodes):
            obs, _ = env.reset(seed=dm.seed + 1_000_003 + ep)
            done, total = False, 0.0
            while not done:
                obs, r, term, trunc, info = env.step(self.act(np.asarray(obs)[None], deterministic=True)[0])
                total, done = total + float(r), term or trunc
            returns.append(total)
            if "is_success" in info:
                successes.append(float(info["is_success"]))
        env.close()
        self.log(f"{stage}/return", float(np.mean(returns)), prog_bar=True, batch_size=1)
        if successes:
            self.log(f"{stage}/success_rate", float(np.mean(successes)), prog_bar=True, batch_size=1)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._play("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._play("test")

    # ------------------------------------------------------------------ checkpoints that resume exactly
    def _rollout_state(self, envs: Any) -> dict[str, Any]:
        vec = envs.env  # under RecordEpisodeStatistics
        subs = [capture_env_state(e) for e in vec.envs] if hasattr(vec, "envs") else [None]
        return {
            "next_obs": self.next_obs.clone(), "next_autoreset": self.next_autoreset.clone(),
            "disc_return": self.disc_return.clone(),
            "torch_rng": torch.get_rng_state(), "recent_returns": list(self.recent_returns),
            "recent_success": list(self.recent_success),
            "history": [list(x) for x in self.history],
            "episode_stats": {k: _plain(getattr(envs, k)) for k in ("episode_returns", "episode_lengths", "prev_dones")},
            "vector": {"_autoreset_envs": _plain(getattr(vec, "_autoreset_envs", None))},
            "envs": subs if all(s is not None for s in subs) else None,
        }

    def _restore_rollout_state(self, envs: Any, s: dict[str, Any]) -> None:
        vec = envs.env
        if s["envs"] is None or not hasattr(vec, "envs"):
            warnings.warn("this environment's state cannot be checkpointed: the resumed run restarts its episodes",
                          RuntimeWarning, stacklevel=2)
            obs, _ = envs.reset(seed=self.trainer.datamodule.seed + int(self.env_steps))
            self.next_obs, self.next_autoreset = torch.as_tensor(obs, dtype=torch.float32), torch.zeros(envs.num_envs)
        else:
            envs.reset(seed=self.trainer.datamodule.seed)  # gymnasium requires a reset before step
            for e, st in zip(vec.envs, s["envs"]):
                restore_env_state(e, st)
            for k, v in s["episode_stats"].items():
                setattr(envs, k, _unplain(v))
            if s["vector"]["_autoreset_envs"] is not None:
                vec._autoreset_envs = _unplain(s["vector"]["_autoreset_envs"])
            self.next_obs, self.next_autoreset = s["next_obs"], s["next_autoreset"]
        torch.set_rng_state(s["torch_rng"])
        self.disc_return = s["disc_return"].clone()
        self.recent_returns = deque(s["recent_returns"], maxlen=20)
        self.recent_success = deque(s.get("recent_success", []), maxlen=20)
        self.history = [tuple(x) for x in s["history"]]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["rl"] = {"obs_dim": self.obs_dim, "action_spec": self.action_spec, "num_tasks": self.num_tasks}
        if self.trainer is not None and getattr(self.trainer, "datamodule", None) is not None and self.trainer.datamodule.envs is not None:
            checkpoint["rl"]["rollout"] = self._rollout_state(self.trainer.datamodule.envs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        c = checkpoint.get("rl")
        if c is None:
            raise ValueError("this checkpoint was not written by PPO (no 'rl' entry)")
        self.build(c["obs_dim"], c["action_spec"], c.get("num_tasks", 1))
        check_compatible(self, checkpoint, hparams=dict(self.hparams))
        self._resume_state = c.get("rollout")


__all__ = ["PPO", "GymEnvs", "PolicyNet", "RunningMeanStd", "gae", "capture_env_state", "restore_env_state"]
