"""``moeparadigms evaluate``: run a saved PPO policy for N episodes, optionally recording videos.

    moeparadigms evaluate --ckpt lightning_logs/version_0/checkpoints/last.ckpt --episodes 10
    moeparadigms evaluate --ckpt last.ckpt --episodes 3 --video-dir videos/   # RecordVideo (rgb_array)

The checkpoint is read with ``weights_only=True``; the policy and the environment id come from it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import gymnasium as gym
import numpy as np

from ..checkpoint import safe_load


def evaluate(ckpt: str | Path, episodes: int = 10, *, env_id: str | None = None, video_dir: str | Path | None = None,
             seed: int = 0, deterministic: bool = True) -> list[float]:
    """Returns of ``episodes`` episodes of the greedy (or sampled) policy in ``ckpt``."""
    from ..benchmarks.gym import make_env, play_episodes
    from .rl import PPO

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes!r}")
    c = safe_load(ckpt)
    env_id = env_id or (c.get("datamodule_hyper_parameters") or {}).get("env_id")
    if env_id is None:
        raise ValueError(f"checkpoint {str(ckpt)!r} names no env_id (not written with GymEnvs): pass --env")
    dm_hp = c.get("datamodule_hyper_parameters") or {}
    env_kwargs = dict(dm_hp.get("env_kwargs") or {})
    model = PPO.load_from_checkpoint(ckpt, weights_only=True, map_location="cpu")
    model.eval()
    try:  # the training envs' kwargs and wrappers, so the policy sees the observations it was trained on
        env = make_env(env_id, env_kwargs, dm_hp.get("wrappers"), render_mode="rgb_array" if video_dir else None)
    except gym.error.Error as e:
        raise ValueError(f"--env {env_id!r} cannot be made: {e}") from None
    if video_dir:
        try:
            import moviepy  # noqa: F401
        except ImportError as e:
            raise RuntimeError("recording videos needs moviepy: pip install 'moeparadigms[rl]'") from e
        env = gym.wrappers.RecordVideo(env, str(video_dir), episode_trigger=lambda i: True, disable_logger=True)
    try:
        returns, _ = play_episodes(env, lambda o: model.act(o[None], deterministic=deterministic)[0], episodes, seed=seed)
    finally:
        env.close()
    return returns


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="moeparadigms evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="a checkpoint written by moeparadigms fit with a PPO model")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--env", default=None, help="Gymnasium id (default: the one the policy was trained on)")
    ap.add_argument("--video-dir", default=None, help="record every episode as MP4 here")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stochastic", action="store_true", help="sample actions instead of the greedy policy")
    a = ap.parse_args(argv)
    r = evaluate(a.ckpt, a.episodes, env_id=a.env, video_dir=a.video_dir, seed=a.seed, deterministic=not a.stochastic)
    print(f"{len(r)} episodes: return {np.mean(r):.2f} ± {np.std(r):.2f} (min {min(r):.1f}, max {max(r):.1f})")
    if a.video_dir:
        print("videos:", *sorted(str(p) for p in Path(a.video_dir).glob("*.mp4")), sep="\n  ")
