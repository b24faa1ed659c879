"""Continual-learning streams as LightningDataModules, built on Avalanche benchmarks.

Every DataModule here wraps an Avalanche benchmark (``train_stream`` / ``test_stream`` of experiences),
so the same stream feeds our Lightning paradigm and Avalanche's own strategies:

* :class:`AvalancheStream` adapts **any** Avalanche benchmark (``SplitMNIST``, ``SplitCIFAR100``,
  ``nc_benchmark(...)``, ``class_incremental_benchmark(...)``, ...), given as an object or as an import
  path plus keyword arguments (the classic ones download their data on first use);
* :class:`SplitDigits`, :class:`PermutedDigits` and :class:`MNIST1D` build offline streams from
  scikit-learn's bundled digits and the procedurally generated MNIST-1D.

One ``trainer.fit`` walks the stream: epoch ``e`` trains on experience ``e // epochs_per_experience``
(set ``trainer.reload_dataloaders_every_n_epochs: 1`` so Lightning asks for the new one), and
validation returns one dataloader per experience so the model can fill the whole accuracy matrix.
Batches are ``(x, y, t)``: input, class label and Avalanche task label.
"""
from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ..checks import SETTINGS, check_positive, check_setting
from .digits import load_digits_tensors, stratified_split
from .sampling import EpochPermutation
from .specs import StreamSpec

Setting = Literal["class-incremental", "domain-incremental", "task-incremental"]


class _TargetsTensorDataset(TensorDataset):
    """A TensorDataset with the ``.targets`` attribute Avalanche's generators read."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        super().__init__(x, y)
        self.targets = y


def materialise(dataset: Dataset, batch_size: int = 2048) -> TensorDataset:
    """An Avalanche experience dataset as in-memory tensors ``(x, y, t)``: small streams then cost one
    tensor index per batch instead of Avalanche's per-sample ``__getitem__`` (about 10x faster here)."""
    xs, ys, ts = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x, y = batch[0], batch[1]
        t = batch[2] if len(batch) > 2 else torch.zeros_like(y)
        xs.append(x.float())
        ys.append(y.long())
        ts.append(torch.as_tensor(t).long())
    return TensorDataset(torch.cat(xs), torch.cat(ys), torch.cat(ts))


_materialise = materialise  # its former private name


def _experience_classes(exp: Any, data: TensorDataset) -> list[int]:
    classes = getattr(exp, "classes_in_this_experience", None)
    if classes is None:  # new-style CLScenario streams may not carry it: read the labels
        classes = torch.unique(data.tensors[1]).tolist()
    return sorted(int(c) for c in classes)


class AvalancheStream(pl.LightningDataModule):
    """Any Avalanche benchmark as a continual DataModule.

    Args:
        benchmark: an Avalanche benchmark object (Python use), or the import path of a benchmark factory
            such as ``"avalanche.benchmarks.classic.SplitMNIST"`` (YAML use), called with ``benchmark_kwargs``.
        benchmark_kwargs: keyword arguments of the factory (e.g. ``{n_experiences: 5, seed: 0}``).
        setting: ``"class-incremental"`` (no task id at test time), ``"domain-incremental"`` (same
            classes, shifting inputs, no task id) or ``"task-incremental"`` (task id given; experience
            ``i`` must carry task label ``i``). Left out, it is inferred from the stream when it is built:
            domain-incremental when every experience holds the same classes, class-incremental otherwise
            (and the choice is printed).
        epochs_per_experience: epochs spent on each experience.
        batch_size: training batch size (evaluation uses ``eval_batch_size``).
        seed: seeds the per-epoch shuffling (a resumed run shuffles identically).
    """

    def __init__(
        self,
        *,
        benchmark: Any = None,
        benchmark_kwargs: Mapping[str, Any] | None = None,
        setting: Setting | None = None,
        epochs_per_experience: int = 3,
        batch_size: int = 32,
        eval_batch_size: int = 1024,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if setting is not None:
            check_setting(setting)
        check_positive(epochs_per_experience=epochs_per_experience, batch_size=batch_size, eval_batch_size=eval_batch_size)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
        if benchmark is None and type(self) is AvalancheStream:
            raise ValueError("benchmark is required: an Avalanche benchmark object or an import path such as "
                             "'avalanche.benchmarks.classic.SplitMNIST'")
        self._benchmark_spec = benchmark
        self.benchmark_kwargs = dict(benchmark_kwargs or {})
        self.setting: str | None = setting
        self.epochs_per_experience = epochs_per_experience
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.seed, self.num_workers = seed, num_workers
        self.benchmark: Any = None
        # Avalanche builds a logger when avalanche.training is first imported and refuses to do that on a
        # non-zero rank of an initialised process group: import it now, before DDP starts
        import avalanche.training  # noqa: F401

    # ------------------------------------------------------------------ building the stream
    def make_benchmark(self) -> Any:
        """The Avalanche benchmark this module serves (subclasses build their own)."""
        spec = self._benchmark_spec
        if isinstance(spec, str):
            module, _, name = spec.rpartition(".")
            if not module:
                raise ValueError(f"benchmark={spec!r} must be a dotted import path like 'avalanche.benchmarks.classic.SplitMNIST'")
            try:
                factory = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError) as e:
                raise ValueError(f"benchmark={spec!r} cannot be imported: {e}") from e
            return factory(**self.benchmark_kwargs)
        if not hasattr(spec, "train_stream") or not hasattr(spec, "test_stream"):
            raise ValueError(f"benchmark must have train_stream and test_stream (an Avalanche benchmark), got {type(spec).__name__}")
        return spec

    def setup(self, stage: str | None = None) -> None:
        if self.benchmark is not None:
            return  # streams are built once: Lightning calls setup per stage
        bm = self.make_benchmark()
        for name, stream in (("train_stream", bm.train_stream), ("test_stream", bm.test_stream)):
            for i, e in enumerate(stream):
                if len(e.dataset) == 0:
                    raise ValueError(f"{type(self).__name__}: experience {i} of the benchmark's {name} is empty (0 samples); "
                                     "every experience needs data to train on and to evaluate")
        train = [materialise(e.dataset) for e in bm.train_stream]
        test = [materialise(e.dataset) for e in bm.test_stream]
        if not train:
            raise ValueError(f"{type(self).__name__}: the benchmark's train_stream has no experiences")
        if len(train) != len(test):
            raise ValueError(f"the benchmark has {len(train)} training but {len(test)} test experiences; "
                             "the accuracy matrix needs one test experience per training experience")
        self.classes_per_experience = [_experience_classes(e, d) for e, d in zip(bm.train_stream, train, strict=True)]
        same = len(train) > 1 and all(c == self.classes_per_experience[0] for c in self.classes_per_experience)
        if self.setting is None:
            self.setting = "domain-incremental" if same else "class-incremental"
            why = "every experience holds the same classes" if same else "the experiences hold different classes"
            rank_zero_info(f"{type(self).__name__}: setting inferred as {self.setting!r} ({why}); set `setting` to choose")
        elif self.setting == "class-incremental" and same:
            rank_zero_warn(f"{type(self).__name__}: setting='class-incremental' but every experience holds the same "
                           f"classes {self.classes_per_experience[0]}: this stream is domain-incremental")
        if self.setting == "task-incremental":
            for i, d in enumerate(train + test):
                labels = torch.unique(d.tensors[2]).tolist()
                if labels != [i % len(train)]:
                    raise ValueError(f"setting='task-incremental' needs experience i to carry task label i; "
                                     f"experience {i % len(train)} carries {labels} (build the benchmark with task labels)")
        self.train_sets, self.test_sets, self.benchmark = train, test, bm

    # ------------------------------------------------------------------ what the model needs to know
    # (each property builds the stream on first use, so ``max_epochs`` can size a Trainer before fit)
    @property
    def num_experiences(self) -> int:
        if self.benchmark is None:
            self.setup()
        return len(self.train_sets)

    @property
    def num_classes(self) -> int:
        self.num_experiences  # noqa: B018 - builds the stream if needed
        return 1 + max(max(c) for c in self.classes_per_experience)

    @property
    def in_features(self) -> int:
        self.num_experiences  # noqa: B018
        return int(self.train_sets[0].tensors[0][0].numel())

    @property
    def spec(self) -> StreamSpec:
        """What the continual paradigm builds from (builds the stream on first use)."""
        return StreamSpec(in_features=self.in_features, num_classes=self.num_classes, setting=self.setting,  # type: ignore[arg-type]
                          classes_per_experience=tuple(tuple(c) for c in self.classes_per_experience),
                          epochs_per_experience=self.epochs_per_experience)

    @property
    def max_epochs(self) -> int:
        """Epochs for the whole stream: set ``trainer.max_epochs`` to this."""
        return self.num_experiences * self.epochs_per_experience

    def experience_at(self, epoch: int) -> int:
        return min(epoch // self.epochs_per_experience, self.num_experiences - 1)

    def train_experience(self, i: int) -> TensorDataset:
        return self.train_sets[i]

    # ------------------------------------------------------------------ dataloaders
    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        # the order depends on (seed, epoch) only: a run resumed from a checkpoint sees the same batches,
        # and DDP ranks split the same global order
        data = self.train_sets[self.experience_at(epoch)]
        return DataLoader(data, batch_size=self.batch_size, sampler=EpochPermutation.for_trainer(len(data), self.seed, self.trainer),
                          num_workers=self.num_workers)

    def val_dataloader(self) -> list[DataLoader]:
        return [DataLoader(d, batch_size=self.eval_batch_size, num_workers=self.num_workers) for d in self.test_sets]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()

    def predict_dataloader(self) -> list[DataLoader]:
        """Every experience's test set, one loader each (labels included; ``predict`` ignores them)."""
        return self.val_dataloader()


# ---------------------------------------------------------------------------------------------- offline streams
class SplitDigits(AvalancheStream):
    """scikit-learn's bundled digits split into ``n_experiences`` experiences of disjoint classes
    (``nc_benchmark``); task labels (one per experience) only in the task-incremental setting.

    Args:
        n_experiences: experiences (10 classes must divide evenly: 1, 2, 5 or 10).
        class_order: the order classes arrive in (default 0..9).
        test_fraction: stratified held-out fraction (per class).
        split_seed: seeds the train/test split (kept apart from ``seed`` so every training seed sees the same split).
    """

    def __init__(self, *, n_experiences: int = 5, class_order: Sequence[int] | None = None, test_fraction: float = 0.2,
                 split_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_positive(n_experiences=n_experiences)
        if 10 % n_experiences:
            raise ValueError(f"n_experiences must divide the 10 digit classes (1, 2, 5 or 10), got {n_experiences}")
        if class_order is not None and sorted(class_order) != list(range(10)):
            raise ValueError(f"class_order must be a permutation of 0..9, got {list(class_order)}")
        if self.setting == "domain-incremental":
            raise ValueError("setting='domain-incremental' does not fit split digits (each experience has new classes); "
                             "use PermutedDigits, or 'class-incremental' / 'task-incremental'")
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        self.n_experiences, self.test_fraction, self.split_seed = n_experiences, test_fraction, split_seed
        self.class_order = list(class_order) if class_order is not None else list(range(10))

    def make_benchmark(self) -> Any:
        from avalanche.benchmarks import nc_benchmark

        x, y = load_digits_tensors()
        tr, te = stratified_split(y, self.test_fraction, self.split_seed)
        return nc_benchmark(
            _TargetsTensorDataset(x[tr], y[tr]), _TargetsTensorDataset(x[te], y[te]), n_experiences=self.n_experiences,
            task_labels=self.setting == "task-incremental", fixed_class_order=self.class_order,
            class_ids_from_zero_in_each_exp=False,  # keep global labels: heads index classes 0..9
        )


class PermutedDigits(AvalancheStream):
    """Digits with a fixed random pixel permutation per experience (all 10 classes every time):
    Avalanche's PermutedMNIST recipe on the bundled digits. Domain-incremental by default."""

    def __init__(self, *, n_experiences: int = 5, test_fraction: float = 0.2, split_seed: int = 0,
                 permutation_seed: int = 0, setting: Setting = "domain-incremental", **kwargs: Any) -> None:
        super().__init__(setting=setting, **kwargs)
        check_positive(n_experiences=n_experiences)
        if setting == "class-incremental":
            raise ValueError("setting='class-incremental' does not fit permuted digits (every experience has all classes); "
                             "use 'domain-incremental' or 'task-incremental'")
        self.n_experiences, self.test_fraction = n_experiences, test_fraction
        self.split_seed, self.permutation_seed = split_seed, permutation_seed

    def make_benchmark(self) -> Any:
        from avalanche.benchmarks import tensors_benchmark

        x, y = load_digits_tensors()
        tr, te = stratified_split(y, self.test_fraction, self.split_seed)
        g = torch.Generator().manual_seed(self.permutation_seed)
        perms = [torch.randperm(x.shape[1], generator=g) for _ in range(self.n_experiences)]
        tasks = list(range(self.n_experiences)) if self.setting == "task-incremental" else [0] * self.n_experiences
        return tensors_benchmark([(x[tr][:, p], y[tr]) for p in perms], [(x[te][:, p], y[te]) for p in perms], task_labels=tasks)


@functools.lru_cache(maxsize=2)
def mnist1d_tensors(data_seed: int = 42) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """MNIST-1D generated procedurally (``mnist1d.data.make_dataset``; never its download path):
    4,000 train / 1,000 test sequences of length 40. ``data_seed`` 42 is the published dataset."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.seed = data_seed
    d = make_dataset(args)
    f = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return f(d["x"]), torch.as_tensor(d["y"]).long(), f(d["x_test"]), torch.as_tensor(d["y_test"]).long()


class MNIST1D(AvalancheStream):
    """MNIST-1D split into experiences of disjoint classes (``nc_benchmark``), like split digits."""

    def __init__(self, *, n_experiences: int = 5, data_seed: int = 42, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        check_positive(n_experiences=n_experiences)
        if 10 % n_experiences:
            raise ValueError(f"n_experiences must divide the 10 classes (1, 2, 5 or 10), got {n_experiences}")
        if self.setting == "domain-incremental":
            raise ValueError("setting='domain-incremental' does not fit split MNIST-1D; use 'class-incremental' or 'task-incremental'")
        self.n_experiences, self.data_seed = n_experiences, data_seed

    def make_benchmark(self) -> Any:
        from avalanche.benchmarks import nc_benchmark

        x, y, xt, yt = mnist1d_tensors(self.data_seed)
        return nc_benchmark(
            _TargetsTensorDataset(x, y), _TargetsTensorDataset(xt, yt), n_experiences=self.n_experiences,
            task_labels=self.setting == "task-incremental", fixed_class_order=list(range(10)),
            class_ids_from_zero_in_each_exp=False,
        )


__all__ = ["AvalancheStream", "SplitDigits", "PermutedDigits", "MNIST1D", "SETTINGS", "Setting", "mnist1d_tensors",
           "materialise"]
