"""The moeparadigms MoE core: routers, expert banks, dispatch, losses, statistics and growth.

``RoutingMetrics`` (a torchmetrics ``Metric``) is imported on first use: torchmetrics pulls in torchvision and
takes longer to import than the rest of the core together.
"""
from typing import Any as _Any

from .dispatchers import Dispatcher
from .experts import FFN, Experts, GLUExperts, MLPExperts, ModuleExperts
from .layer import MoE, MoEOutput, RoutingStats
from .params import ExpertParam, Remap, remap_optimizer
from .routing import (
    BiasBalancedRouter,
    ExpertChoiceRouter,
    HashRouter,
    Router,
    Routing,
    SoftMoERouter,
    SoftRouting,
    SwitchRouter,
    TaskConditionedRouter,
    TopKRouter,
    register_bias_update,
    update_router_biases,
)

__all__ = [
    "FFN", "Experts", "GLUExperts", "MLPExperts", "ModuleExperts", "MoE", "MoEOutput", "RoutingStats",
    "RoutingMetrics", "ExpertParam", "Remap", "remap_optimizer", "BiasBalancedRouter", "ExpertChoiceRouter",
    "HashRouter", "Router", "Routing", "SoftMoERouter", "SoftRouting", "SwitchRouter", "TaskConditionedRouter",
    "TopKRouter", "update_router_biases", "register_bias_update", "Dispatcher",
]

# Every component remembers the plain {class_path, init_args} it was built from, so a paradigm built in Python
# can store it in its checkpoint and `load_from_checkpoint(path)` rebuilds the model (moeparadigms._config).
from .._config import record_init as _record_init  # noqa: E402

for _cls in (MoE, FFN, MLPExperts, GLUExperts, ModuleExperts, BiasBalancedRouter, ExpertChoiceRouter, HashRouter,
             SoftMoERouter, SwitchRouter, TaskConditionedRouter, TopKRouter):
    _record_init(_cls)
del _cls, _record_init


def __getattr__(name: str) -> _Any:
    if name == "RoutingMetrics":
        from .metrics import RoutingMetrics

        globals()["RoutingMetrics"] = RoutingMetrics
        return RoutingMetrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
