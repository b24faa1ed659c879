"""The moeparadigms MoE core: routers, expert banks, dispatch, losses, statistics and growth."""
from .experts import FFN, Experts, GLUExperts, MLPExperts, ModuleExperts
from .layer import MoE, MoEOutput, RoutingStats
from .metrics import RoutingMetrics
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
)

__all__ = [
    "FFN", "Experts", "GLUExperts", "MLPExperts", "ModuleExperts", "MoE", "MoEOutput", "RoutingStats",
    "RoutingMetrics", "ExpertParam", "Remap", "remap_optimizer", "BiasBalancedRouter", "ExpertChoiceRouter",
    "HashRouter", "Router", "Routing", "SoftMoERouter", "SoftRouting", "SwitchRouter", "TaskConditionedRouter",
    "TopKRouter",
]
