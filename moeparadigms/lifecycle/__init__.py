"""Expert lifecycle and reliability: sparse upcycling and drop-upcycling (:mod:`.upcycle`, and the
:class:`Upcycle` callback that starts a paradigm from a dense checkpoint), MC-SMoE merging and usage pruning
(:mod:`.merge`), Honda et al.'s post-hoc pessimistic aggregation (:mod:`.aggregate`), and attacks,
corruptions and shortcut-shift data for robustness benchmarks (:mod:`.robustness`)."""
from .aggregate import COMBINE, PredictionMoE, aggregate, forced_expert_logits, router_diversity_loss
from .callback import Upcycle, upcycled_hparams
from .merge import (
    GroupedRouter,
    RoutingProfile,
    align_permutation,
    group_experts,
    merge_experts,
    prune_by_usage,
    routing_profile,
)
from .robustness import (
    CORRUPTIONS,
    SEVERITY,
    accuracy,
    corrupt,
    expert_dropout,
    fgsm,
    mean_ci95,
    pgd,
    shortcut_features,
)
from .upcycle import UpcycledFFN, UpcycleReport, aux_loss, drop_reinit_, upcycle

__all__ = [
    "COMBINE", "PredictionMoE", "aggregate", "forced_expert_logits", "router_diversity_loss", "Upcycle",
    "upcycled_hparams", "GroupedRouter", "RoutingProfile", "align_permutation", "group_experts", "merge_experts", "prune_by_usage",
    "routing_profile", "CORRUPTIONS", "SEVERITY", "accuracy", "corrupt", "expert_dropout", "fgsm", "mean_ci95", "pgd",
    "shortcut_features", "UpcycledFFN", "UpcycleReport", "aux_loss", "drop_reinit_", "upcycle",
]
