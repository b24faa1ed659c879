"""One training-order sampler for every DataModule: resumable and data-parallel exact."""
from __future__ import annotations

from torch.utils.data import DistributedSampler

SEED_STRIDE = 1_000_003  # seeds s and s+1 must not give orders that are one epoch apart


class EpochPermutation(DistributedSampler):
    """torch's ``DistributedSampler`` over ``range(n)``, shuffled with the seed ``seed * 1_000_003``: the
    order in epoch ``e`` depends only on ``(seed, e)``, split across data-parallel ranks.

    * Resuming: Lightning calls ``set_epoch`` with the restored epoch, so a resumed run sees the batches an
      uninterrupted one would (a DataLoader's own ``generator`` is also consumed whenever Lightning
      creates an extra iterator, so its order would drift).
    * DDP: rank ``r`` of ``R`` takes positions ``r, r+R, ...`` of the one global order (padded by
      wrapping around to a multiple of ``R``), so ``R`` ranks with batch ``b`` see exactly the global
      batches of one process with batch ``R*b``. Being a ``DistributedSampler``, Lightning uses it as is
      instead of re-shuffling with its own seed.

    Only the constructor is ours: it takes the world from its arguments (no process group needed) and
    accepts an empty dataset.

    Args:
        n: dataset length.  seed: base seed.  num_replicas, rank: the data-parallel world (from the Trainer).
        epoch: the starting epoch (``set_epoch`` updates it).
    """

    def __init__(self, n: int, seed: int, *, num_replicas: int = 1, rank: int = 0, epoch: int = 0) -> None:
        if n < 0 or num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"EpochPermutation: need n >= 0, num_replicas >= 1 and 0 <= rank < num_replicas; got "
                             f"n={n}, num_replicas={num_replicas}, rank={rank}")
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed * SEED_STRIDE,
                         drop_last=False)
        self.n = n
        self.set_epoch(epoch)

    @classmethod
    def for_trainer(cls, n: int, seed: int, trainer: object | None) -> EpochPermutation:
        """The sampler for ``trainer``'s world size, rank and current epoch (a lone process without one)."""
        if trainer is None:
            return cls(n, seed)
        return cls(n, seed, num_replicas=trainer.world_size, rank=trainer.global_rank, epoch=trainer.current_epoch)
