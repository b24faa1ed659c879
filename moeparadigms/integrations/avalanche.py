"""The MoE inside Avalanche strategies, without Lightning.

* :class:`AvalancheMoE` is an Avalanche ``DynamicModule``: an ``MoEMLP`` classifier whose
  ``adaptation(experience)`` grows experts when a new *training* experience arrives (freezing the old
  experts and their router rows). Avalanche also calls ``adaptation`` before every *evaluation*
  experience, so growth happens only in training mode and only once per experience.
* :class:`MoELossPlugin` is a ``SupervisedPlugin`` that adds the MoE's auxiliary losses (load balance,
  z-loss) to the strategy's loss before the backward pass.

Avalanche's strategies (Naive, Replay, LwF, EWC, ...) rebuild their optimizer after adaptation
(``make_optimizer``), so the grown experts are trained::

    model = AvalancheMoE(in_features=64, num_classes=10, moe=MoE(router=TopKRouter(d_model=64, num_experts=2, top_k=1),
                                                                 experts=MLPExperts(d_model=64, hidden=128, num_experts=2)))
    strategy = Replay(model=model, optimizer=Adam(model.parameters(), 1e-3), criterion=CrossEntropyLoss(),
                      mem_size=200, train_mb_size=32, train_epochs=5, plugins=[MoELossPlugin()])
    for exp in benchmark.train_stream:
        strategy.train(exp)
"""
from __future__ import annotations

from typing import Any

from avalanche.core import SupervisedPlugin
from avalanche.models import DynamicModule
from torch import Tensor

from ..core import MoE
from ..core.experts import Init
from ..nets import MoEMLP
from ..paradigms.continual_growth import grow_experts


class AvalancheMoE(DynamicModule):
    """An MoE MLP classifier that grows ``experts_per_experience`` experts per new training experience.

    Args:
        in_features, num_classes: input width (inputs are flattened) and output classes.
        moe: the MoE layer (any router whose rows can grow: top-k, switch, bias-balanced...).
        experts_per_experience: experts added at each new training experience after the first (0: never grow).
        freeze_old: freeze existing experts and their router rows before growing (no drift of old experts).
        init: how new experts start: ``"fresh"``, ``"copy"`` (of the last expert) or ``"mean"``.
    """

    def __init__(self, *, in_features: int, num_classes: int, moe: MoE, experts_per_experience: int = 1,
                 freeze_old: bool = True, init: Init = "fresh", depth: int = 1) -> None:
        super().__init__()
        if not isinstance(experts_per_experience, int) or experts_per_experience < 0:
            raise ValueError(f"experts_per_experience must be an integer >= 0, got {experts_per_experience!r}")
        if init not in ("fresh", "copy", "mean"):
            raise ValueError(f"init={init!r} is not supported; choose one of ['copy', 'fresh', 'mean']")
        self.net = MoEMLP(in_features=in_features, out_features=num_classes, moe=moe, depth=depth)
        self.experts_per_experience, self.freeze_old, self.init = experts_per_experience, freeze_old, init
        self.seen_experiences: list[int] = []
        self.last_aux_loss: Tensor | None = None  # read by MoELossPlugin: Avalanche models return logits only

    def adaptation(self, experience: Any) -> None:
        if not self.training:
            return  # Avalanche adapts before evaluation too: never grow on test data
        exp_id = int(getattr(experience, "current_experience", len(self.seen_experiences)))
        if exp_id in self.seen_experiences:
            return
        if self.seen_experiences and self.experts_per_experience:
            for moe in self.net.moe_layers():
                grow_experts(moe, self.experts_per_experience, freeze_old=self.freeze_old, init=self.init)
            # no remap_optimizer here: Avalanche's make_optimizer re-reads model.parameters() after adaptation
        self.seen_experiences.append(exp_id)

    def __getstate__(self) -> dict[str, Any]:
        # LwF and others deepcopy the model; a loss still attached to the graph cannot be copied
        state = self.__dict__.copy()
        state["last_aux_loss"] = None
        return state

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)
        self.last_aux_loss = out.aux_loss
        return out.y


class MoELossPlugin(SupervisedPlugin):
    """Adds every :class:`AvalancheMoE`'s auxiliary loss of the current forward to ``strategy.loss``."""

    def __init__(self, *, weight: float = 1.0) -> None:
        super().__init__()
        if not weight >= 0:
            raise ValueError(f"weight must be >= 0, got {weight!r}")
        self.weight = weight

    def before_backward(self, strategy: Any, *args: Any, **kwargs: Any) -> None:
        for m in strategy.model.modules():
            if isinstance(m, AvalancheMoE) and m.last_aux_loss is not None:
                strategy.loss = strategy.loss + self.weight * m.last_aux_loss


__all__ = ["AvalancheMoE", "MoELossPlugin"]
