"""scikit-learn's bundled digits (1,797 8x8 images, 10 classes) as a LightningDataModule: no download."""
from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from .sampling import EpochPermutation
from .specs import SupervisedSpec


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """Digits images scaled to [0, 1], shape (1797, 64), and labels (1797,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target, dtype=torch.long)


def stratified_split(y: torch.Tensor, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, test) with the same class proportions, reproducible under ``seed``."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = max(1, round(test_fraction * idx.numel()))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


class DigitsDataModule(pl.LightningDataModule):
    """Train/val/test splits of the digits (val and test are the same held-out split unless ``val_fraction``)."""

    def __init__(self, *, batch_size: int = 64, test_fraction: float = 0.25, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.save_hyperparameters()

    #: 8x8 images, flattened; digits 0..9
    spec = SupervisedSpec(in_features=64, num_classes=10)

    def setup(self, stage: str | None = None) -> None:
        x, y = load_digits_tensors()
        tr, te = stratified_split(y, self.hparams.test_fraction, self.hparams.seed)
        self.train_set = TensorDataset(x[tr], y[tr])
        self.test_set = TensorDataset(x[te], y[te])

    def train_dataloader(self) -> DataLoader:
        sampler = EpochPermutation.for_trainer(len(self.train_set), self.hparams.seed, self.trainer)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512, num_workers=self.hparams.num_workers)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        """The held-out split (labels included; ``predict`` ignores them)."""
        return self.val_dataloader()
