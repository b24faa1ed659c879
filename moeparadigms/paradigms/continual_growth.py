"""The parts of the continual paradigm around its network: the experience-masked router, Gaussian experience
inference, and the growth policies (what happens to the experts at each new experience). Imported and re-exported
by :mod:`moeparadigms.paradigms.continual` (the YAMLs' ``class_path``), which holds the LightningModule.

Shape legend: B batch, F input features, D model width, C classes, T experiences, E experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._config import record_init
from ..core import MoE, TopKRouter
from ..core.experts import Init
from ..core.params import Remap, merge_remaps

if TYPE_CHECKING:
    import pytorch_lightning as pl

    from .continual import ContinualMoE

MASKED = -1e9  # finite "minus infinity": the core checks router logits are finite


# ---------------------------------------------------------------------------------------------- router
class ExperienceRouter(TopKRouter):
    """Top-k router restricted, per experience, to the experts a growth policy allowed it.

    ``allowed[t, e]`` says whether experience ``t`` may route to expert ``e`` (a buffer, so it is saved
    in checkpoints and grows with the experts); an experience with no allowed expert yet routes over
    all experts. ``task_id_T`` (one experience id per token) is required.
    """

    def __init__(self, *, d_model: int, num_experts: int, max_experiences: int = 20, top_k: int = 1,
                 temperature: float = 1.0) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts, top_k=top_k, noisy=False, temperature=temperature)
        if not isinstance(max_experiences, int) or max_experiences < 1:
            raise ValueError(f"max_experiences must be an integer >= 1, got {max_experiences!r}")
        self.max_experiences = max_experiences
        self.register_buffer("allowed", torch.zeros(max_experiences, num_experts, dtype=torch.bool))

    def _scores(self, x_TD: Tensor, task_id_T: Tensor | None) -> Tensor:
        if task_id_T is None:
            raise ValueError("ExperienceRouter needs task_id (the experience of each token); got task_id=None")
        logits = super()._scores(x_TD, task_id_T)
        allowed = self.allowed[task_id_T]
        allowed = allowed | ~allowed.any(-1, keepdim=True)  # nothing assigned yet: route over all experts
        return logits.masked_fill(~allowed, MASKED)

    def _grow_buffers(self, n: int, init: Init, src: list[int]) -> None:
        self.allowed = torch.cat([self.allowed, self.allowed.new_zeros(self.max_experiences, n)], dim=1)

    def _prune_buffers(self, keep_E: Tensor) -> None:
        self.allowed = self.allowed[:, keep_E.to(self.allowed.device)]


# ---------------------------------------------------------------------------------------------- task inference
class GaussianTaskInference(nn.Module):
    """Per (experience, class) input means and shrunk covariances; ``log p(t | x)`` from them.

    ``Sigma_tc' = (1 - shrinkage) Sigma_tc + shrinkage * mean(diag Sigma_tc) I`` keeps the covariance
    invertible with few samples per class (FeCAM's shrinkage). Only statistics are stored, never samples.
    """

    def __init__(self, *, num_experiences: int, num_classes: int, in_features: int, shrinkage: float = 0.05) -> None:
        super().__init__()
        if not 0 < shrinkage <= 1:
            raise ValueError(f"shrinkage must be in (0, 1], got {shrinkage!r}")
        self.shrinkage = shrinkage
        T, C, Fd = num_experiences, num_classes, in_features
        self.register_buffer("count", torch.zeros(T, C, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(T, C, Fd, dtype=torch.float64))
        self.register_buffer("cov", torch.zeros(T, C, Fd, Fd, dtype=torch.float64))
        self._cache: tuple[Tensor, Tensor] | None = None

    @torch.no_grad()
    def update(self, experience: int, x_BF: Tensor, y_B: Tensor) -> None:
        x = x_BF.flatten(1).double().to(self.mean.device)
        for c in torch.unique(y_B).tolist():
            xc = x[y_B.to(x.device) == c]
            mu = xc.mean(0)
            d = xc - mu
            self.count[experience, c] = xc.shape[0]
            self.mean[experience, c] = mu
            self.cov[experience, c] = d.T @ d / max(xc.shape[0] - 1, 1)
        self._cache = None

    def _precisions(self) -> tuple[Tensor, Tensor]:
        if self._cache is None:
            Fd = self.cov.shape[-1]
            eye = torch.eye(Fd, dtype=self.cov.dtype, device=self.cov.device)
            scale = self.cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-6)[..., None, None]
            S = (1 - self.shrinkage) * self.cov + self.shrinkage * scale * eye
            S = torch.where(self.count[..., None, None] > 0, S, eye)  # unseen (t, c): placeholder, masked below
            L = torch.linalg.cholesky(S)
            self._cache = (torch.cholesky_inverse(L), 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1))
        return self._cache

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def log_posterior(self, x_BF: Tensor) -> Tensor:
        """``(B, T)`` log p(t | x) over experiences with statistics (uniform prior over them; -inf for the
        others); all zeros (uniform) before any experience has statistics."""
        x = x_BF.flatten(1).double().to(self.mean.device)
        seen_TC = self.count > 0
        if not seen_TC.any():
            return x.new_zeros(x.shape[0], self.count.shape[0]).float()
        P, logdet = self._precisions()
        d = x[:, None, None, :] - self.mean[None]  # (B, T, C, F)
        maha = torch.einsum("btcf,tcfg,btcg->btc", d, P, d)
        prior = (self.count / self.count.sum(-1, keepdim=True).clamp_min(1)).clamp_min(1e-300).log()
        ll = -0.5 * (maha + logdet + x.shape[1] * math.log(2 * math.pi)) + prior
        ll = ll.masked_fill(~seen_TC, -math.inf)
        log_px_t = torch.logsumexp(ll, dim=-1)  # (B, T): -inf for experiences without statistics
        return torch.log_softmax(log_px_t, dim=-1).float()


# ---------------------------------------------------------------------------------------------- growth policies
@dataclass
class Decision:
    """What happens at an experience boundary: ``grow`` new experts (0: none), or re-use the experts of
    experience ``reuse`` (None: the new ones, or all experts when the policy shares them)."""

    grow: int = 0
    reuse: int | None = None


class GrowthPolicy:
    """Decides, at the start of each experience, how the MoE changes. ``freezes`` policies freeze every
    old expert, router row and head (and, with ``freeze_shared``, the input layer and norms after the
    first experience) so old paths stay bit-identical."""

    freezes: bool = True
    freeze_shared: bool = True
    experts: int = 1
    init: Init = "fresh"

    def decide(self, module: ContinualMoE, experience: int, x_BF: Tensor, y_B: Tensor) -> Decision:
        raise NotImplementedError  # pragma: no cover - interface


def _check_growth_args(experts: int, init: str) -> None:
    if not isinstance(experts, int) or experts < 1:
        raise ValueError(f"experts must be an integer >= 1 (experts added per experience), got {experts!r}")
    if init not in ("fresh", "copy", "mean"):
        raise ValueError(f"init={init!r} is not supported; choose one of ['copy', 'fresh', 'mean']")


@record_init
class ExpertPerExperience(GrowthPolicy):
    """Add ``experts`` experts for every new experience (the first experience takes the MoE's initial
    experts) and freeze the old ones. ``init``: new experts start ``"fresh"``, as a ``"copy"`` of the
    previous experience's last expert, or as the ``"mean"`` of all."""

    def __init__(self, *, experts: int = 1, init: Init = "fresh", freeze_shared: bool = True) -> None:
        _check_growth_args(experts, init)
        self.experts, self.init, self.freeze_shared = experts, init, freeze_shared

    def decide(self, module: ContinualMoE, experience: int, x_BF: Tensor, y_B: Tensor) -> Decision:
        return Decision(grow=self.experts if experience > 0 else 0)


@record_init
class GrowOnDemand(GrowthPolicy):
    """Grow only when the existing experts do not already solve the new experience (Expert Gate's
    relatedness test, with the model's own paths as the gate).

    For each earlier experience ``s`` whose classes cover the new labels, the new data is run through
    path ``s``; ``signal="loss"`` measures its cross-entropy, ``"entropy"`` its mean normalised
    predictive entropy (the router's uncertainty about which path fits). If the best value is at most
    ``threshold`` the new experience re-uses ``s``'s (frozen) experts and trains only a head copied from
    ``s``; otherwise ``experts`` new experts are added. New classes are never covered, so in the
    class-incremental setting this policy always grows.
    """

    def __init__(self, *, threshold: float = 0.5, signal: Literal["loss", "entropy"] = "loss", experts: int = 1,
                 init: Init = "fresh", freeze_shared: bool = True) -> None:
        _check_growth_args(experts, init)
        if signal not in ("loss", "entropy"):
            raise ValueError(f"signal={signal!r} is not supported; choose one of ['entropy', 'loss']")
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold!r}")
        self.threshold, self.signal = threshold, signal
        self.experts, self.init, self.freeze_shared = experts, init, freeze_shared
        self.last_scores: dict[int, float] = {}

    @torch.no_grad()
    def decide(self, module: ContinualMoE, experience: int, x_BF: Tensor, y_B: Tensor) -> Decision:
        if experience == 0:
            return Decision()
        labels = torch.unique(y_B)
        scores: dict[int, float] = {}
        for s in range(experience):
            if not bool(module.class_mask[s, labels].all()):
                continue
            logits = module.path_logits(x_BF, s)[0]
            if self.signal == "loss":
                scores[s] = F.cross_entropy(logits, y_B).item()
            else:
                p = logits.softmax(-1)
                k = int(module.class_mask[s].sum())
                ent = -(p * p.clamp_min(1e-12).log()).sum(-1) / math.log(max(k, 2))
                scores[s] = ent.mean().item()
        self.last_scores = scores
        if scores:
            best = min(scores, key=scores.__getitem__)
            if scores[best] <= self.threshold:
                return Decision(reuse=best)
        return Decision(grow=self.experts)


@record_init
class FixedExperts(GrowthPolicy):
    """The fixed-size baseline: no growth, no freezing; every experience routes over all experts."""

    freezes = False
    freeze_shared = False

    def __init__(self) -> None:
        pass

    def decide(self, module: ContinualMoE, experience: int, x_BF: Tensor, y_B: Tensor) -> Decision:
        return Decision()


# ---------------------------------------------------------------------------------------------- router inference
TASK_INFERENCE = ("gaussian", "router")


def expert_owners(num_experts: int, initial: int, per_experience: int) -> Tensor:
    """``(E,)`` the experience that added each expert under :class:`ExpertPerExperience`: experience 0 holds the
    MoE's ``initial`` experts, experience ``t > 0`` the ``per_experience`` added at its start."""
    e = torch.arange(num_experts)
    return torch.where(e < initial, 0, 1 + torch.div(e - initial, per_experience, rounding_mode="floor"))


def router_log_posterior(probs_BE: Tensor, owner_E: Tensor, num_experiences: int) -> Tensor:
    """``(B, T)`` log p(t | x) read off a learned router: the summed probabilities of the experts experience ``t``
    added (``-inf`` for experiences that have none yet). ContinualMoE's ``task_inference="router"``."""
    p_BT = probs_BE.new_zeros(probs_BE.shape[0], num_experiences).index_add(1, owner_E.to(probs_BE.device), probs_BE)
    # underflowed probabilities stay finite (and their gradient too); experiences without experts are -inf
    return torch.where(p_BT > 0, p_BT.clamp_min(1e-30).log(), -math.inf)


def fit_task_bias(log_pt_BT: Tensor, log_py_t_BTC: Tensor, y_B: Tensor, *, steps: int) -> Tensor:
    """Bias correction (BiC): the per-experience offset ``(T,)`` on ``log p(t | x)`` minimising the cross-entropy
    of ``log sum_t p(t | x) p(y | x, t)`` on the replay buffer (L-BFGS, ``steps`` iterations), pulled towards 0 so
    50 samples cannot overfit it."""
    bias = torch.zeros(log_pt_BT.shape[1], device=log_pt_BT.device, requires_grad=True)
    opt = torch.optim.LBFGS([bias], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        lp = (log_pt_BT + bias).log_softmax(-1)
        logp = torch.logsumexp(lp[:, :, None] + log_py_t_BTC, dim=1)
        loss = F.nll_loss(logp.clamp_min(-1e4), y_B) + 0.1 * bias.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return bias.detach()


def grow_experts(moe: MoE, n: int, *, freeze_old: bool, init: Init = "fresh", source: list[int] | None = None) -> Remap:
    """The continual growth step, shared by :class:`~moeparadigms.paradigms.continual.ContinualMoE` and the Avalanche
    adapter: freeze every existing expert and its router row (``freeze_old``), then add ``n`` experts (``init`` /
    ``source`` as :meth:`MoE.add_experts`). Returns the parameter remap for
    :func:`~moeparadigms.core.remap_optimizer`."""
    remaps: list[Remap] = []
    if freeze_old:
        remaps.append(moe.freeze_experts(list(range(moe.num_experts)), router=True))
    if n:
        remaps.append(moe.add_experts(n, init=init, source=source))
    return merge_remaps(*remaps)


def rewrap_ddp(trainer: pl.Trainer) -> None:
    """Re-wrap the module in a fresh DistributedDataParallel after growth or freezing.

    DDP fixes its set of gradient-synchronised parameters (those with ``requires_grad``) when it wraps the
    module; grown experts would otherwise train on each rank's gradients alone and frozen ones would be
    waited for. Each experience trains its own head only, so the other heads are unused parameters:
    ``find_unused_parameters`` is switched on. A no-op without DDP."""
    from pytorch_lightning.strategies import DDPStrategy

    strategy = trainer.strategy
    if not isinstance(strategy, DDPStrategy) or trainer.world_size == 1 or not trainer.training:
        return
    # a Lightning private: DDPStrategy keeps the DistributedDataParallel kwargs in ``_ddp_kwargs`` and has no
    # public way to change them after the Trainer built it (its constructor is the only documented door, and the
    # strategy is the user's). Re-wrapping with ``configure_ddp`` is the strategy's own public method.
    strategy._ddp_kwargs["find_unused_parameters"] = True
    strategy.model = strategy.lightning_module
    strategy.configure_ddp()


__all__ = ["fit_task_bias", "ExperienceRouter", "GaussianTaskInference", "GrowthPolicy", "ExpertPerExperience", "GrowOnDemand",
           "FixedExperts", "Decision", "MASKED", "grow_experts", "rewrap_ddp", "TASK_INFERENCE", "expert_owners",
           "router_log_posterior"]
