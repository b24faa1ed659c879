"""Start any paradigm from a dense checkpoint, upcycled, from YAML: a Lightning callback.

.. code-block:: yaml

    trainer:
      callbacks:
        - class_path: moeparadigms.lifecycle.Upcycle
          init_args: {init_from: dense.ckpt, num_experts: 8, top_k: 2, init: copy}

The config builds the *dense* model (e.g. the supervised ``MoEClassifier``, a PPO policy or the continual module with
``num_experts: 1``, the multi-task ``TaskMoE`` architecture with ``num_experts: 1, top_k: 1``). In
``setup`` (before ``configure_optimizers``, before a ``--ckpt_path`` is restored) the callback loads the dense
weights from ``init_from`` with :func:`moeparadigms.checkpoint.safe_load` (``weights_only=True``) and upcycles
the module (:func:`~moeparadigms.lifecycle.upcycle`). What it did is written into every checkpoint:

* ``checkpoint["upcycle"]``: the :class:`~moeparadigms.lifecycle.UpcycleReport` (plain values);
* the hyperparameters: every single-expert ``moeparadigms.core.MoE`` config found in them (``class_path`` /
  ``init_args`` dicts, as LightningCLI saves them) and every single-expert ``TaskMoE`` architecture is rewritten to the upcycled router and expert count, so
  ``Module.load_from_checkpoint(path)`` rebuilds the upcycled model from the file alone.

When a run resumes or tests from a checkpoint (``trainer.ckpt_path`` set), the dense weights are not read: the
structure is upcycled and the checkpoint's weights replace everything.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback

from ..checkpoint import check_compatible, safe_load
from ..core import TaskConditionedRouter
from .upcycle import UpcycleInit, UpcycleReport, check_upcycle_args, upcycle

_MOE = "moeparadigms.core.MoE"
_TASK_MOE = ("moeparadigms.paradigms.multitask.TaskMoE", "moeparadigms.paradigms.multitask_nets.TaskMoE")
_STACKED = ("moeparadigms.core.MLPExperts", "moeparadigms.core.GLUExperts",
            "moeparadigms.core.experts.MLPExperts", "moeparadigms.core.experts.GLUExperts")


class Upcycle(Callback):
    """Load a dense checkpoint into the module and upcycle it before training (see the module docstring).

    Args:
        init_from: path of the dense checkpoint (a Lightning checkpoint with ``state_dict``, or a bare
            state dict); its tensors must fit the model the config builds.
        num_experts, top_k, init, drop_ratio, seed: as :func:`~moeparadigms.lifecycle.upcycle`.
    """

    def __init__(self, *, init_from: str, num_experts: int, top_k: int = 2, init: UpcycleInit = "copy",
                 drop_ratio: float = 0.5, seed: int | None = 0) -> None:
        check_upcycle_args(num_experts, top_k, init, drop_ratio)
        if not init_from:
            raise ValueError(f"init_from must be the path of a dense checkpoint, got {init_from!r}")
        self.init_from, self.num_experts, self.top_k = str(init_from), num_experts, top_k
        self.init, self.drop_ratio, self.seed = init, drop_ratio, seed
        self.report: UpcycleReport | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(pl_module, "_upcycled", None) is not None:
            return  # fit then test on the same module: upcycle once
        if getattr(pl_module, "built", True) is False:
            # modules that build their networks from the data in their own ``setup`` (PPO from the env's spaces, the
            # continual module from the stream), which Lightning runs after the callbacks': build them now (their
            # setup is idempotent, so Lightning's later call finds them built)
            pl_module.setup(stage)
        if self.top_k == 1 and any(isinstance(m, TaskConditionedRouter) for m in pl_module.modules()):
            # the upcycled router renormalises (the dense output at step 0); a TaskMoE config of top_k 1 rebuilds
            # it without renormalising, so the checkpoint would not reload as the model that was trained
            raise ValueError("Upcycle top_k=1 of a task-conditioned MoE (Task-MoE) does not reload from its config; "
                             "use top_k >= 2")
        if getattr(trainer, "ckpt_path", None) is None:
            self._load_dense(pl_module)
        _, report = upcycle(pl_module, num_experts=self.num_experts, top_k=self.top_k, init=self.init,
                            drop_ratio=self.drop_ratio, seed=self.seed)
        if not report.converted:
            raise ValueError(
                f"Upcycle found nothing to convert in {type(pl_module).__name__} (no dense FFN, "
                f"Sequential(Linear, act, Linear) or single-expert MoE); skipped: {report.skipped or 'none'}"
            )
        pl_module._upcycled = report.as_dict()
        self.report = report

    def _load_dense(self, pl_module: pl.LightningModule) -> None:
        if not Path(self.init_from).is_file():
            raise FileNotFoundError(f"Upcycle init_from={self.init_from!r}: no such checkpoint file")
        ck = safe_load(self.init_from)
        sd = ck.get("state_dict", ck) if isinstance(ck, dict) else None
        if not isinstance(sd, dict):
            raise ValueError(f"Upcycle init_from={self.init_from!r} holds no state_dict")
        try:
            check_compatible(pl_module, {"state_dict": sd})
        except ValueError as e:
            raise ValueError(f"Upcycle init_from={self.init_from!r} does not fit the dense model the config builds "
                             f"(build it with one expert, as it was trained): {e}") from None
        pl_module.load_state_dict(sd)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        done = getattr(pl_module, "_upcycled", None)
        if done is None:
            return
        checkpoint["upcycle"] = dict(done, init_from=self.init_from)
        hp = checkpoint.get("hyper_parameters")
        if isinstance(hp, dict):
            checkpoint["hyper_parameters"] = upcycled_hparams(hp, self.num_experts, self.top_k)


def upcycled_hparams(hp: Any, num_experts: int, top_k: int) -> Any:
    """A copy of ``hp`` with every single-expert ``moeparadigms.core.MoE`` config (router and stacked experts
    as ``class_path``/``init_args`` dicts) changed to ``num_experts`` experts under a renormalised top-k
    router: the config of the model :func:`~moeparadigms.lifecycle.upcycle` produces."""
    if isinstance(hp, list):
        return [upcycled_hparams(v, num_experts, top_k) for v in hp]
    if not isinstance(hp, dict):
        return hp
    out = {k: upcycled_hparams(v, num_experts, top_k) for k, v in hp.items()}
    args = out.get("init_args")
    if out.get("class_path") in _TASK_MOE and isinstance(args, dict) and args.get("num_experts") == 1:
        # the multi-task Task-MoE architecture: its blocks' TaskConditionedRouters are built from these two values
        out["init_args"] = dict(args, num_experts=num_experts, top_k=top_k)
        return out
    if out.get("class_path") == _MOE and isinstance(args, dict):
        router, experts = args.get("router"), args.get("experts")
        if (isinstance(router, dict) and isinstance(experts, dict) and experts.get("class_path") in _STACKED
                and (router.get("init_args") or {}).get("num_experts") == 1):
            r_args = router.get("init_args") or {}
            router = {"class_path": "moeparadigms.core.TopKRouter",
                      "init_args": {"d_model": r_args.get("d_model"), "num_experts": num_experts, "top_k": top_k,
                                    "renormalize": True}}
            experts = dict(experts, init_args=dict(experts.get("init_args") or {}, num_experts=num_experts))
            out["init_args"] = dict(args, router=router, experts=experts)
    return out


__all__ = ["Upcycle", "upcycled_hparams"]
