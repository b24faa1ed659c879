"""Episodic benchmarks for meta-learning, generated offline: sinusoid and multimodal regression, and N-way
K-shot classification on scikit-learn's digits.

A *task* is a (support, query) pair. Every DataModule serves meta-batches of ``meta_batch_size`` tasks as
tensors ``(x_support [T, S, F], y_support [T, S], x_query [T, Q, F], y_query [T, Q])``. Training meta-batch
``i`` is drawn from a generator seeded by ``(seed, i)`` alone, so a resumed run and a fresh one see the
same tasks; the validation and test tasks are a fixed set (``num_test_tasks``, seeded separately), with
test functions/classes never used for training where the benchmark allows it.

Shape legend: T tasks, S support points (K per task, or N*K), Q query points, F input features.
"""
from __future__ import annotations

import math
from typing import Literal

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..checks import check_positive
from .specs import EpisodeSpec

Batch = tuple[Tensor, Tensor, Tensor, Tensor]


def _u(g: torch.Generator, n: int, lo: float, hi: float) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


# ---------------------------------------------------------------------------------------------- regression
def sinusoid_params(g: torch.Generator, n: int) -> Tensor:
    """Finn et al. (2017): amplitude in [0.1, 5], phase in [0, pi]. Returns (n, 2)."""
    return torch.stack([_u(g, n, 0.1, 5.0), _u(g, n, 0.0, math.pi)], 1)


def sinusoid(x: Tensor, p: Tensor) -> Tensor:
    return p[:, :1] * torch.sin(x - p[:, 1:2])


MODES = ("sine", "linear", "quadratic", "l1", "tanh")
#: five more families for ``families=10`` (more modes than MMAML's five; issue 14's "harder task conflicts"):
#: ``A sin(2x - phi)``, ``A (x - c)^3 + b``, a Gaussian bump ``A exp(-(x - c)^2 / 2) + b``, a square wave
#: ``A sign(sin(x - phi))`` and a hinge ``A relu(x - c) + b``
EXTRA_MODES = ("sine2x", "cubic", "bump", "square", "hinge")
ALL_MODES = MODES + EXTRA_MODES


def multimodal_params(g: torch.Generator, n: int, families: int = len(MODES)) -> tuple[Tensor, Tensor]:
    """MMAML's five function families (Vuorio et al. 2019), one family per task, drawn uniformly: sine
    ``A sin(x - phi)``, linear ``A x + b``, quadratic ``A (x - c)^2 + b``, l1-norm ``A |x - c| + b`` and tanh
    ``A tanh(x - c) + b``; the parameter ranges are in :func:`_family_ranges`. Returns (mode (n,), params (n, 3)).
    ``families``: the first that many of :data:`ALL_MODES` (5, the default: MMAML's, the same draws as before the
    option; 10 adds :data:`EXTRA_MODES`)."""
    if not isinstance(families, int) or not 1 <= families <= len(ALL_MODES):
        raise ValueError(f"families must be an integer in [1, {len(ALL_MODES)}], got {families!r}")
    mode = torch.randint(0, families, (n,), generator=g)
    p = torch.empty(n, 3)
    for m, (a, b, c) in enumerate(_family_ranges()[:families]):
        idx = (mode == m).nonzero().flatten()
        k = idx.numel()
        p[idx] = torch.stack([_u(g, k, *a), _u(g, k, *b), _u(g, k, *c)], 1)
    return mode, p


def _family_ranges() -> list[tuple[tuple[float, float], ...]]:
    """(A, b or phase, c) ranges per family, in MODES order."""
    return [
        ((0.1, 5.0), (0.0, math.pi), (0.0, 0.0)),  # sine: amplitude, phase
        ((-3.0, 3.0), (-3.0, 3.0), (0.0, 0.0)),  # linear: slope, intercept
        ((-0.15, 0.15), (-3.0, 3.0), (-3.0, 3.0)),  # quadratic: A, b, c
        ((-3.0, 3.0), (-3.0, 3.0), (-3.0, 3.0)),  # l1-norm: A, b, c
        ((-3.0, 3.0), (-3.0, 3.0), (-3.0, 3.0)),  # tanh: A, b, c
        ((0.1, 5.0), (0.0, math.pi), (0.0, 0.0)),  # sine2x: amplitude, phase
        ((-0.02, 0.02), (-3.0, 3.0), (-2.0, 2.0)),  # cubic: A, b, c (|A (x - c)^3| <= 6.9 on [-5, 5])
        ((-5.0, 5.0), (-1.0, 1.0), (-3.0, 3.0)),  # bump: A, b, c
        ((0.1, 3.0), (0.0, math.pi), (0.0, 0.0)),  # square: amplitude, phase
        ((-1.0, 1.0), (-3.0, 3.0), (-3.0, 3.0)),  # hinge: A, b, c
    ]


def multimodal(x: Tensor, mode: Tensor, p: Tensor) -> Tensor:
    A, b, c = p[:, :1], p[:, 1:2], p[:, 2:3]
    out = torch.stack([
        A * torch.sin(x - b), A * x + b, A * (x - c) ** 2 + b, A * (x - c).abs() + b, A * torch.tanh(x - c) + b,
        # EXTRA_MODES (families > 5)
        A * torch.sin(2 * x - b), A * (x - c) ** 3 + b, A * torch.exp(-0.5 * (x - c) ** 2) + b,
        A * torch.sign(torch.sin(x - b)), A * torch.relu(x - c) + b,
    ], 0)  # (modes, n, points)
    return out[mode, torch.arange(x.shape[0])]


class _MetaBatches(Dataset):
    """``length`` meta-batches of ``tasks`` tasks; item ``i`` is drawn from a generator seeded by ``(seed, i)``.
    With ``total``, the last batch holds only the tasks left (``total`` tasks in all, not ``length * tasks``)."""

    def __init__(self, dm: EpisodicDataModule, length: int, seed: int, tasks: int, split: str,
                 total: int | None = None) -> None:
        self.dm, self.length, self.seed, self.tasks, self.split, self.total = dm, length, seed, tasks, split, total

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> Batch:
        if not 0 <= i < self.length:
            raise IndexError(f"meta-batch {i} out of range ({self.length})")
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        n = self.tasks if self.total is None else min(self.tasks, self.total - i * self.tasks)
        return self.dm.sample_tasks(n, g, self.split)


class EpisodicDataModule(pl.LightningDataModule):
    """Base of the episodic DataModules.

    Args:
        shots: K, support examples per task (per class for classification).
        query: query examples per task (per class for classification).
        meta_batch_size: tasks per training step.
        meta_iterations: training meta-batches served per epoch (set ``trainer.max_epochs: 1``).
        num_test_tasks: fixed validation/test tasks (>= 600 for the paper-style confidence intervals).
        eval_batch_size: tasks per evaluation batch.
        seed: training tasks; the evaluation tasks use ``seed + 10_000``.
    """

    kind: Literal["regression", "classification"] = "regression"
    in_features = 1
    out_features = 1

    def __init__(self, *, shots: int = 10, query: int = 10, meta_batch_size: int = 25, meta_iterations: int = 1000,
                 num_test_tasks: int = 600, eval_batch_size: int = 100, seed: int = 0) -> None:
        super().__init__()
        check_positive(shots=shots, query=query, meta_batch_size=meta_batch_size, meta_iterations=meta_iterations,
                       num_test_tasks=num_test_tasks, eval_batch_size=eval_batch_size)
        self.shots, self.query, self.meta_batch_size = shots, query, meta_batch_size
        self.meta_iterations, self.num_test_tasks, self.eval_batch_size, self.seed = (
            meta_iterations, num_test_tasks, eval_batch_size, seed)
        self.save_hyperparameters()

    @property
    def spec(self) -> EpisodeSpec:
        """What the meta-learning paradigm builds from."""
        return EpisodeSpec(in_features=self.in_features, out_features=self.out_features, kind=self.kind)

    def sample_tasks(self, n: int, g: torch.Generator, split: str) -> Batch:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_MetaBatches(self, self.meta_iterations, self.seed, self.meta_batch_size, "train"), batch_size=None)

    def _eval(self) -> DataLoader:
        n_batches = math.ceil(self.num_test_tasks / self.eval_batch_size)
        # exactly num_test_tasks tasks (600 in batches of 100 or of 128 alike: the CIs are over the tasks asked for)
        data = _MetaBatches(self, n_batches, self.seed + 10_000, self.eval_batch_size, "test", total=self.num_test_tasks)
        return DataLoader(data, batch_size=None)

    def val_dataloader(self) -> DataLoader:
        return self._eval()

    def test_dataloader(self) -> DataLoader:
        return self._eval()


class SinusoidTasks(EpisodicDataModule):
    """K-shot sinusoid regression (Finn et al. 2017): x uniform in [-5, 5]."""

    def sample_tasks(self, n: int, g: torch.Generator, split: str) -> Batch:
        p = sinusoid_params(g, n)
        x = _u(g, n * (self.shots + self.query), -5.0, 5.0).view(n, -1)
        y = sinusoid(x, p)
        return x[:, : self.shots, None], y[:, : self.shots], x[:, self.shots :, None], y[:, self.shots :]


class MultimodalTasks(EpisodicDataModule):
    """K-shot regression over MMAML's five function families (x in [-5, 5], Gaussian noise on y).

    Args:
        noise_std: standard deviation of the observation noise (MMAML: 0.3); the query targets are noisy
            too, so ``noise_std**2`` is the floor of the query MSE.
        families: how many function families (modes) tasks are drawn from: 5, MMAML's (the default), up to 10
            (:data:`EXTRA_MODES` added in order); see :func:`multimodal_params`.
    """

    def __init__(self, *, noise_std: float = 0.3, families: int = len(MODES), **kwargs) -> None:
        super().__init__(**kwargs)
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        if not isinstance(families, int) or not 1 <= families <= len(ALL_MODES):
            raise ValueError(f"families must be an integer in [1, {len(ALL_MODES)}], got {families!r}")
        self.noise_std, self.families = noise_std, families

    def sample_tasks(self, n: int, g: torch.Generator, split: str) -> Batch:
        mode, p = multimodal_params(g, n, self.families)
        x = _u(g, n * (self.shots + self.query), -5.0, 5.0).view(n, -1)
        y = multimodal(x, mode, p) + self.noise_std * torch.randn(x.shape, generator=g)
        return x[:, : self.shots, None], y[:, : self.shots], x[:, self.shots :, None], y[:, self.shots :]


class FewShotDigits(EpisodicDataModule):
    """N-way K-shot classification on scikit-learn's 8x8 digits, train and test classes disjoint.

    Args:
        n_way: classes per task. Labels are permuted per task.
        train_classes: the digits meta-training draws from; the others are the test classes.
    """

    kind = "classification"
    in_features = 64

    def __init__(self, *, n_way: int = 3, train_classes: tuple[int, ...] | list[int] = (0, 1, 2, 3, 4, 5), **kwargs) -> None:
        super().__init__(**kwargs)
        train = sorted({int(c) for c in train_classes})
        test = [c for c in range(10) if c not in train]
        if any(not 0 <= c <= 9 for c in train):
            raise ValueError(f"train_classes must be digits 0..9, got {list(train_classes)}")
        if not isinstance(n_way, int) or n_way < 2 or n_way > min(len(train), len(test)):
            raise ValueError(f"n_way must be an integer in [2, {min(len(train), len(test))}] for train classes {train} "
                             f"and test classes {test}, got {n_way!r}")
        self.n_way, self.classes = n_way, {"train": train, "test": test}
        self.out_features = n_way
        from .digits import load_digits_tensors

        self.x, self.y = load_digits_tensors()
        self.by_class = {c: (self.y == c).nonzero().flatten() for c in range(10)}
        need = self.shots + self.query
        short = [c for c in range(10) if self.by_class[c].numel() < need]
        if short:
            raise ValueError(f"shots + query = {need} exceeds the examples of digit(s) {short}")

    def sample_tasks(self, n: int, g: torch.Generator, split: str) -> Batch:
        pool = torch.tensor(self.classes[split])
        K, Q = self.shots, self.query
        xs, ys, xq, yq = [], [], [], []
        for _ in range(n):
            cls = pool[torch.randperm(pool.numel(), generator=g)[: self.n_way]]
            sx, sy, qx, qy = [], [], [], []
            for label, c in enumerate(cls.tolist()):
                idx = self.by_class[c][torch.randperm(self.by_class[c].numel(), generator=g)[: K + Q]]
                sx.append(self.x[idx[:K]])
                qx.append(self.x[idx[K:]])
                sy.append(torch.full((K,), label))
                qy.append(torch.full((Q,), label))
            xs.append(torch.cat(sx))
            ys.append(torch.cat(sy))
            xq.append(torch.cat(qx))
            yq.append(torch.cat(qy))
        return torch.stack(xs), torch.stack(ys), torch.stack(xq), torch.stack(yq)
