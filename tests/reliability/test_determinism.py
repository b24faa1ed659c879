"""Two runs with the same seed (``seed_everything`` + ``trainer.deterministic=true``) log identical metrics and
end with identical weights, for every paradigm the CLI trains (CPU)."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest

from .helpers import cli, last_checkpoint, max_abs_diff, state

QUICK = ["--trainer.deterministic=true", "--trainer.enable_progress_bar=false", "--trainer.limit_train_batches=6",
         "--trainer.limit_val_batches=2"]
PARADIGMS = {
    "supervised": ["--config", "tasks/supervised/digits.yaml", "--config", "configs/supervised/moe_mlp.yaml",
                   "--trainer.max_epochs=2"],
    "multitask": ["--config", "tasks/multitask/digits.yaml", "--config", "configs/multitask/mmoe.yaml",
                  "--trainer.max_epochs=2"],
    "continual": ["--config", "tasks/continual/split_digits.yaml", "--config", "configs/continual/expert_growth.yaml",
                  "--data.init_args.n_experiences=2", "--data.init_args.epochs_per_experience=1",
                  "--trainer.max_epochs=2", "--model.init_args.plots=false"],
}


def _metrics(root: Path) -> list[dict[str, str]]:
    files = sorted(root.rglob("metrics.csv"))
    assert files, f"no metrics.csv under {root} (the CSV logger is a CLI default)"
    rows = list(csv.DictReader(files[-1].open()))
    assert rows, "metrics.csv is empty"
    return rows


@pytest.mark.parametrize("paradigm", sorted(PARADIGMS))
def test_determinism_two_seeded_runs_identical(paradigm, tmp_path):
    for run in ("a", "b"):
        cli("fit", *PARADIGMS[paradigm], *QUICK, f"--trainer.default_root_dir={tmp_path / run}")
    ma, mb = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert ma == mb, f"{paradigm}: logged metrics differ between two seeded runs"
    assert max_abs_diff(state(last_checkpoint(tmp_path / "a")), state(last_checkpoint(tmp_path / "b"))) == 0.0


def test_determinism_different_seeds_differ(tmp_path):
    """The check above can fail: another seed gives other metrics."""
    for run, seed in (("a", 0), ("b", 1)):
        cli("fit", *PARADIGMS["supervised"], *QUICK, f"--seed_everything={seed}", f"--trainer.default_root_dir={tmp_path / run}")
    assert _metrics(tmp_path / "a") != _metrics(tmp_path / "b")


@pytest.mark.parametrize("n,world", [(0, 1), (7, 1), (7, 2), (100, 3), (1437, 2)])
def test_epoch_permutation_is_the_seeded_split_order(n, world):
    """The training order depends only on (seed, epoch); rank r of R takes positions r, r+R, ... of one global
    order wrapped to a multiple of R (a plain reference of what resume and DDP parity rely on)."""
    import math

    import torch

    from moeparadigms.benchmarks.sampling import EpochPermutation

    for seed, epoch in ((0, 0), (3, 5)):
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=g).tolist()
        total = math.ceil(n / world) * world
        order = (order * (total // max(n, 1) + 1))[:total] if n else []
        for rank in range(world):
            got = list(EpochPermutation(n, seed, num_replicas=world, rank=rank, epoch=epoch))
            assert got == order[rank:total:world]
