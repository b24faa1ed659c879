"""Multi-task benchmarks: the MMoE paper's synthetic regression with controllable task correlation, and
several label functions on scikit-learn's digits trained jointly.

Both DataModules yield multi-label batches ``(x_BF, y_BT)``: every sample carries one target per task
(``y_BT`` is float; classification targets are class indices stored as floats so one tensor holds mixed
tasks). Each exposes ``spec``: a :class:`~moeparadigms.benchmarks.specs.MultiTaskSpec` (the input width and
the :class:`~moeparadigms.benchmarks.specs.TaskSpec` list) the multi-task model is built from.

Shape legend: N samples, B batch, F input features, T tasks, M sine terms.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from ..checks import check_positive
from .digits import load_digits_tensors, stratified_split
from .specs import MultiTaskSpec, TaskSpec

# ---------------------------------------------------------------------------------------------------
# (1) MMoE synthetic regression (Ma et al. 2018, section 3.2)
# ---------------------------------------------------------------------------------------------------


class MMoESyntheticProblem:
    """One instance of the MMoE paper's two-task regression generator.

    Two orthonormal directions ``u1, u2`` (F-dimensional); ``w1 = c*u1``,
    ``w2 = c*(p*u1 + sqrt(1 - p^2)*u2)``; ``x ~ N(0, I_F)``;
    ``y_k = w_k^T x + sum_{i=1..m} sin(alpha_i * w_k^T x + beta_i) + eps``, ``eps ~ N(0, noise_std^2)``.
    ``alpha_i, beta_i ~ N(0, 1)`` are drawn once per instance and shared by both tasks (as in the paper:
    the tasks differ only in their direction, so ``p`` is the cosine between ``w1`` and ``w2``).

    ``p`` is *not* the label correlation: the sine terms make the labels' Pearson correlation smaller
    than ``p`` for ``0 < p < 1``; :func:`label_correlation` measures it.

    The directions and the sine parameters come from ``seed`` alone (not from ``p``), so a sweep over
    ``p`` with one seed changes only the angle between the tasks.
    """

    def __init__(
        self, *, p: float, num_features: int = 100, c: float = 1.0, m: int = 10, noise_std: float = 0.1, seed: int = 0
    ) -> None:
        if not -1.0 <= p <= 1.0:
            raise ValueError(f"p must be in [-1, 1] (the cosine between the task directions), got {p!r}")
        if not isinstance(num_features, int) or num_features < 2:
            raise ValueError(f"num_features must be an integer >= 2 (two orthonormal directions), got {num_features!r}")
        if not isinstance(m, int) or m < 0:
            raise ValueError(f"m (number of sine terms) must be an integer >= 0, got {m!r}")
        if not c > 0:
            raise ValueError(f"c must be > 0, got {c!r}")
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        self.p, self.num_features, self.c, self.m, self.noise_std, self.seed = p, num_features, c, m, noise_std, seed
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(num_features, 2, generator=g, dtype=torch.float64))
        u1, u2 = q[:, 0], q[:, 1]
        self.w_TF = torch.stack([c * u1, c * (p * u1 + math.sqrt(max(0.0, 1.0 - p * p)) * u2)])
        self.alpha_M = torch.randn(m, generator=g, dtype=torch.float64)
        self.beta_M = torch.randn(m, generator=g, dtype=torch.float64)

    def sample(self, n: int, *, seed: int) -> tuple[Tensor, Tensor]:
        """``n`` samples ``(x (n, F) float32, y (n, 2) float32)``, reproducible under ``seed``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive integer, got {n!r}")
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, self.num_features, generator=g, dtype=torch.float64)
        z_NT = x @ self.w_TF.T
        waves = torch.sin(self.alpha_M * z_NT.unsqueeze(-1) + self.beta_M).sum(-1)
        y = z_NT + waves + self.noise_std * torch.randn(n, 2, generator=g, dtype=torch.float64)
        return x.float(), y.float()


def label_correlation(y_NT: Tensor) -> float:
    """Pearson correlation between the two task labels (columns 0 and 1)."""
    if y_NT.dim() != 2 or y_NT.shape[1] != 2:
        raise ValueError(f"expected labels of shape (N, 2), got {tuple(y_NT.shape)}")
    return float(torch.corrcoef(y_NT.T.double())[0, 1])


SYNTHETIC_TASKS = [TaskSpec(name="task1", kind="regression"), TaskSpec(name="task2", kind="regression")]


class MMoESyntheticDataModule(pl.LightningDataModule):
    """Train/val/test sets drawn from one :class:`MMoESyntheticProblem` (distinct sample seeds)."""

    tasks = SYNTHETIC_TASKS

    def __init__(
        self,
        *,
        p: float = 0.5,
        num_features: int = 100,
        c: float = 1.0,
        m: int = 10,
        noise_std: float = 0.1,
        n_train: int = 4000,
        n_val: int = 1000,
        n_test: int = 2000,
        batch_size: int = 128,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive(n_train=n_train, n_val=n_val, n_test=n_test, batch_size=batch_size)
        self.save_hyperparameters()
        # validates p, c, m, ... at construction, not at setup
        self.problem = MMoESyntheticProblem(p=p, num_features=num_features, c=c, m=m, noise_std=noise_std, seed=seed)

    @property
    def spec(self) -> MultiTaskSpec:
        return MultiTaskSpec(in_features=self.hparams.num_features, tasks=tuple(self.tasks))

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        # sample seeds derived from the problem seed: three disjoint draws
        self.train_set = TensorDataset(*self.problem.sample(h.n_train, seed=3 * h.seed + 1))
        self.val_set = TensorDataset(*self.problem.sample(h.n_val, seed=3 * h.seed + 2))
        self.test_set = TensorDataset(*self.problem.sample(h.n_test, seed=3 * h.seed + 3))

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1024)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=1024)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


# ---------------------------------------------------------------------------------------------------
# (2) Multi-task digits: label functions of the digit
# ---------------------------------------------------------------------------------------------------

#: name -> (number of classes, label function of the digit 0..9)
DIGIT_LABELS = {
    "digit": (10, lambda d: d),
    "parity": (2, lambda d: d % 2),
    "ge5": (2, lambda d: (d >= 5).long()),
    # a 3-way grouping that cuts across the others: {0,3,6,9}, {1,4,7}, {2,5,8}
    "mod3": (3, lambda d: d % 3),
}


def digit_tasks(names: Sequence[str]) -> list[TaskSpec]:
    names = list(names)
    bad = [n for n in names if n not in DIGIT_LABELS]
    if bad or not names:
        raise ValueError(f"tasks={names!r}: choose a non-empty list from {sorted(DIGIT_LABELS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks={names!r} lists a task twice")
    return [TaskSpec(name=n, kind="classification", num_classes=DIGIT_LABELS[n][0]) for n in names]


def digit_targets(digit_N: Tensor, names: Sequence[str]) -> Tensor:
    """Targets ``(N, T)`` (class indices as floats) for the label functions ``names``."""
    return torch.stack([DIGIT_LABELS[n][1](digit_N) for n in names], dim=1).float()


class MultiTaskDigitsDataModule(pl.LightningDataModule):
    """scikit-learn digits (no download) with several label functions (``labels``, from
    :data:`DIGIT_LABELS`) as tasks, trained jointly; 75/25 stratified split (val = test, as in the supervised
    digits benchmark)."""

    def __init__(
        self,
        *,
        labels: Sequence[str] = ("digit", "parity", "ge5", "mod3"),
        batch_size: int = 64,
        test_fraction: float = 0.25,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive(batch_size=batch_size)
        self.tasks = digit_tasks(list(labels))
        self.save_hyperparameters()

    @property
    def spec(self) -> MultiTaskSpec:
        return MultiTaskSpec(in_features=64, tasks=tuple(self.tasks))

    def setup(self, stage: str | None = None) -> None:
        x, d = load_digits_tensors()
        tr, te = stratified_split(d, self.hparams.test_fraction, self.hparams.seed)
        y = digit_targets(d, [t.name for t in self.tasks])
        self.train_set = TensorDataset(x[tr], y[tr])
        self.test_set = TensorDataset(x[te], y[te])

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, generator=g)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
