"""The contract every paradigm LightningModule keeps, in one thin base class.

:class:`ParadigmModule` does six things the paradigms used to do each in their own way:

* **build from the data's spec, once**: ``setup`` reads the DataModule's typed ``spec``
  (:mod:`moeparadigms.benchmarks.specs`) and calls :meth:`ParadigmModule.build`, which builds the network the
  first time (:meth:`_build`, the paradigm's own) and afterwards only checks that the data still fits;
* **spec checkpointing**: the spec (plain values) and any state the paradigm adds
  (:meth:`checkpoint_state`) go into the checkpoint under :attr:`checkpoint_key`; loading rebuilds the network
  from it before Lightning loads the weights, so ``load_from_checkpoint`` needs no data;
* **compatibility check**: a checkpoint that does not fit is reported by
  :func:`~moeparadigms.checkpoint.check_compatible` (every mismatching entry), not by torch's size error;
* **the optimizer**: ``optimizer`` is a LightningCLI optimizer config (``OptimizerCallable``: ``class_path`` /
  ``init_args`` in YAML, any ``params -> Optimizer`` callable in Python); without one the paradigm's
  :meth:`default_optimizer` is used, the optimizer and hyperparameters each paradigm always had, so results
  reproduce. ``weight_decay`` means decoupled weight decay (AdamW) in every paradigm that has it;
* **aux-loss-free balancing**: the bias of every ``BiasBalancedRouter`` follows the load once per optimizer step
  (:meth:`on_before_optimizer_step`);
* **plot listing**: plots a paradigm writes are appended to :attr:`plot_paths`
  (:class:`~moeparadigms.callbacks.ListPlots` prints them); :meth:`plot_dir` is where they go.

Deliberately thin (STYLE.md 9): no step logic, no logging conventions; each paradigm reads top to bottom.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
import torch

from ..benchmarks.specs import DataSpec
from ..checkpoint import check_compatible
from ..core import update_router_biases

#: what ``optimizer`` takes: LightningCLI's ``OptimizerCallable`` (parameters -> optimizer)
OptimizerCallable = Callable[[Iterable], torch.optim.Optimizer]


class ParadigmModule(pl.LightningModule):
    """Base of the paradigm modules (supervised, continual, multi-task, meta, RL); see the module docstring.

    Subclasses set :attr:`checkpoint_key` and :attr:`spec_type`, implement :meth:`_build` and
    :meth:`default_optimizer`, and may extend :meth:`checkpoint_state` / :meth:`restore_checkpoint_state`.
    """

    #: the checkpoint entry holding the spec (and :meth:`checkpoint_state`)
    checkpoint_key: ClassVar[str] = "spec"
    #: the spec type this paradigm builds from
    spec_type: ClassVar[type[DataSpec]] = DataSpec

    def __init__(self, *, optimizer: OptimizerCallable | None = None) -> None:
        super().__init__()
        if optimizer is not None and not callable(optimizer):
            raise TypeError(f"optimizer must be a callable params -> torch.optim.Optimizer (LightningCLI's "
                            f"OptimizerCallable: class_path/init_args in YAML), got {optimizer!r}")
        self.optimizer_factory = optimizer
        self.spec: DataSpec | None = None
        self.plot_paths: list[Path] = []

    # ------------------------------------------------------------------ building from the spec, once
    @property
    def built(self) -> bool:
        """Whether the network exists (built from the arguments, the data's spec or a checkpoint). Callbacks that
        need the network before Lightning calls :meth:`setup` (``moeparadigms.lifecycle.Upcycle``) call
        ``setup`` themselves when this is False; it builds once."""
        return self.spec is not None

    def build(self, spec: DataSpec) -> None:
        """Build the network for ``spec`` the first time; later calls only check that ``spec`` fits."""
        if not isinstance(spec, self.spec_type):
            raise TypeError(f"{type(self).__name__} builds from a {self.spec_type.__name__}, got {type(spec).__name__}")
        if self.spec is not None:
            if spec != self.spec:
                raise ValueError(self.spec_mismatch(spec))
            self.spec = spec  # equal: the same network; keep the data's serving facts (fields with compare=False)
            return
        self._build(spec)
        self.spec = spec

    def _build(self, spec: Any) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def spec_mismatch(self, spec: DataSpec) -> str:
        """The error message when the data's spec differs from the one the model was built for."""
        return f"this {type(self).__name__} was built for {self.spec}; the data is {spec}"

    def data_spec(self, datamodule: Any) -> DataSpec:
        """The DataModule's typed spec, checked to be the kind this paradigm builds from."""
        spec = getattr(datamodule, "spec", None)
        if not isinstance(spec, self.spec_type):
            raise TypeError(f"{type(self).__name__} needs a DataModule whose `spec` is a {self.spec_type.__name__} "
                            f"({self.spec_type.paradigm} data from moeparadigms.benchmarks), got {type(datamodule).__name__}"
                            + ("" if spec is None else f" with a {type(spec).__name__}"))
        return spec

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if self.spec is not None and getattr(dm, "spec", None) is None:
            return  # built from its arguments, trained on the user's own data (or plain dataloaders): nothing to check
        self.build(self.data_spec(dm))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        """Plain-data state the paradigm adds to its checkpoint entry (beside the spec)."""
        return {}

    def restore_checkpoint_state(self, entry: dict[str, Any]) -> None:
        """Called on load after the network is built, before the weights are compared and loaded."""

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.spec is not None:
            checkpoint[self.checkpoint_key] = {**self.spec.to_dict(), **self.checkpoint_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        entry = checkpoint.get(self.checkpoint_key)
        if entry is None and self.spec is None:
            raise ValueError(f"this checkpoint was not written by {type(self).__name__} (no {self.checkpoint_key!r} entry)")
        if entry is not None:
            self.build(self.spec_type.from_dict(entry))
            self.restore_checkpoint_state(entry)
        check_compatible(self, checkpoint, hparams=dict(self.hparams))

    # ------------------------------------------------------------------ the optimizer
    def default_optimizer(self, params: Iterable) -> torch.optim.Optimizer:  # pragma: no cover - interface
        raise NotImplementedError

    def configure_optimizers(self) -> Any:
        params = self.parameters()
        if self.optimizer_factory is not None:
            return self.optimizer_factory(params)
        return self.default_optimizer(params)

    # ------------------------------------------------------------------ aux-loss-free balancing
    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Apply the load the bias-balanced routers accumulated over this step's micro-batches
        (:func:`~moeparadigms.core.update_router_biases`; nothing without such routers). Lightning calls this hook
        before every optimizer step, under manual optimization too (inside ``optimizer.step()``, as PPO and MAML
        step). A subclass that overrides it calls ``super()``."""
        update_router_biases(self)

    # ------------------------------------------------------------------ plots
    def plot_dir(self) -> Path | None:
        """The trainer's log directory, where the paradigm's plots go (a collective under DDP: every rank
        calls it); None without one or on ranks other than 0."""
        log_dir = self.trainer.log_dir
        return Path(log_dir) if log_dir and self.trainer.is_global_zero else None


__all__ = ["ParadigmModule", "OptimizerCallable"]
