"""One training-order sampler for every DataModule: resumable and data-parallel exact."""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import DistributedSampler


class EpochPermutation(DistributedSampler):
    """A shuffle whose order in epoch ``e`` depends only on ``(seed, e)``, split across data-parallel ranks.

    * Resuming: Lightning calls ``set_epoch`` with the restored epoch, so a resumed run sees the batches an
      uninterrupted one would (a DataLoader's own ``generator`` is also consumed whenever Lightning
      creates an extra iterator, so its order would drift).
    * DDP: rank ``r`` of ``R`` takes positions ``r, r+R, ...`` of the one global order (padded by
      wrapping around to a multiple of ``R``), so ``R`` ranks with batch ``b`` see exactly the global
      batches of one process with batch ``R*b``. It is a ``DistributedSampler``, so Lightning uses it as is
      instead of re-shuffling with its own seed.

    Args:
        n: dataset length.  seed: base seed.  num_replicas, rank: the data-parallel world (from the Trainer).
        epoch: the starting epoch (``set_epoch`` updates it).
    """

    def __init__(self, n: int, seed: int, *, num_replicas: int = 1, rank: int = 0, epoch: int = 0) -> None:
        # DistributedSampler.__init__ wants a dataset and an initialised process group; we need neither
        if n < 0 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"EpochPermutation: need n >= 0, num_replicas >= 1 and 0 <= rank < num_replicas; got "
                             f"n={n}, num_replicas={num_replicas}, rank={rank}")
        self.n, self.seed, self.epoch = n, seed, epoch
        self.num_replicas, self.rank, self.shuffle, self.drop_last = num_replicas, rank, True, False
        self.num_samples = math.ceil(n / num_replicas) if n else 0
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.epoch))
        order = torch.randperm(self.n, generator=g).tolist()
        if self.num_replicas > 1 and order:
            order += (order * math.ceil(self.total_size / len(order)))[: self.total_size - len(order)]
        return iter(order[self.rank : self.total_size : self.num_replicas] if self.num_replicas > 1 else order)

    def __len__(self) -> int:
        return self.num_samples if self.num_replicas > 1 else self.n

    @classmethod
    def for_trainer(cls, n: int, seed: int, trainer: object | None) -> EpochPermutation:
        """The sampler for ``trainer``'s world size, rank and current epoch (a lone process without one)."""
        if trainer is None:
            return cls(n, seed)
        return cls(n, seed, num_replicas=trainer.world_size, rank=trainer.global_rank, epoch=trainer.current_epoch)
