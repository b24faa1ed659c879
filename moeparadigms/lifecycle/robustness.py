"""Robustness probes in the spirit of MoE-RBench (Chen et al. 2024), written in torch: adversarial attacks
(FGSM, PGD under an L-infinity budget), input corruptions at graded severities, and the data for a
shortcut-shift task. Everything is offline and deterministic under a seed.

* :func:`fgsm` (Goodfellow et al. 2015): ``x + eps * sign(grad_x loss)``, clipped to the valid range.
* :func:`pgd` (Madry et al. 2018): ``steps`` signed-gradient steps of size ``alpha`` from a uniform random start
  in the eps-ball, each projected back onto the ball and the valid range.
* :data:`CORRUPTIONS`: ``gaussian_noise``, ``impulse_noise`` (salt and pepper), ``pixel_dropout`` (zeroed
  features), ``contrast`` (pulled to the per-sample mean), ``blur`` (3x3 box filter on 8x8 images, or a
  width-3 moving average on 1-D signals), ``translate`` (a covariate shift: the image or signal moved right,
  zero fill); severities 1..5 (:data:`SEVERITY`).
* :func:`shortcut_features`: append a one-hot "shortcut" block that names the label with probability
  ``agree`` (another, random class otherwise); ``agree=0`` gives the flipped test set (always a wrong class).

The attacks take ``logits_fn(x) -> (B, C)`` (any model: MoE, dense, an aggregation) and attack the
cross-entropy of those logits.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

LogitsFn = Callable[[Tensor], Tensor]


def _clip(x: Tensor, lo: float | None, hi: float | None) -> Tensor:
    return x if lo is None and hi is None else x.clamp(lo, hi)


def _check_eps(eps: float) -> None:
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")


def fgsm(logits_fn: LogitsFn, x: Tensor, y: Tensor, eps: float, *, clip: tuple[float | None, float | None] = (0.0, 1.0)) -> Tensor:
    """Fast gradient sign method: one step of size ``eps`` up the loss gradient's sign."""
    _check_eps(eps)
    x_adv = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(logits_fn(x_adv), y)
        (g,) = torch.autograd.grad(loss, x_adv)
    return _clip(x.detach() + eps * g.sign(), *clip).detach()


def pgd(logits_fn: LogitsFn, x: Tensor, y: Tensor, eps: float, *, steps: int = 10, alpha: float | None = None,
        random_start: bool = True, clip: tuple[float | None, float | None] = (0.0, 1.0),
        generator: torch.Generator | None = None) -> Tensor:
    """Projected gradient descent on the loss (ascent), L-infinity ball of radius ``eps``; ``alpha``
    defaults to ``2.5 * eps / steps`` (Madry et al.)."""
    _check_eps(eps)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    alpha = 2.5 * eps / steps if alpha is None else alpha
    x0 = x.detach()
    x_adv = x0.clone()
    if random_start and eps > 0:
        noise = torch.rand(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device) * 2 - 1
        x_adv = _clip(x0 + eps * noise, *clip)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(logits_fn(x_adv), y)
            (g,) = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + alpha * g.sign()
        x_adv = _clip(torch.min(torch.max(x_adv, x0 - eps), x0 + eps), *clip).detach()
    return x_adv


#: per corruption, the strength at severities 1..5
SEVERITY: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.05, 0.1, 0.2, 0.3, 0.5),   # noise std (inputs in [0, 1])
    "impulse_noise": (0.02, 0.05, 0.1, 0.2, 0.3),   # fraction of features set to 0 or 1
    "pixel_dropout": (0.1, 0.2, 0.3, 0.5, 0.7),     # fraction of features zeroed
    "contrast": (0.8, 0.6, 0.4, 0.3, 0.2),          # factor towards the per-sample mean
    "blur": (0.25, 0.5, 0.75, 0.9, 1.0),            # mix of the blurred and the clean input
    "translate": (1, 2, 3, 4, 5),                   # shift right by this many pixels / steps, zero fill
}
CORRUPTIONS = tuple(SEVERITY)


def _blur(x: Tensor, image_side: int | None) -> Tensor:
    if image_side is not None and x.shape[1] == image_side * image_side:
        img = x.reshape(-1, 1, image_side, image_side)
        out = F.avg_pool2d(F.pad(img, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return out.reshape(x.shape)
    sig = x.reshape(x.shape[0], 1, -1)
    return F.avg_pool1d(F.pad(sig, (1, 1), mode="replicate"), 3, stride=1).reshape(x.shape)


def _translate(x: Tensor, k: int, image_side: int | None) -> Tensor:
    if image_side is not None and x.shape[1] == image_side * image_side:
        img = x.reshape(-1, image_side, image_side)
        out = torch.zeros_like(img)
        out[:, :, k:] = img[:, :, : image_side - k]
        return out.reshape(x.shape)
    out = torch.zeros_like(x)
    out[:, k:] = x[:, : x.shape[1] - k]
    return out


def corrupt(x: Tensor, name: str, severity: int, *, generator: torch.Generator | None = None,
            image_side: int | None = 8, clip: tuple[float | None, float | None] = (0.0, 1.0)) -> Tensor:
    """``x`` (B, F) with corruption ``name`` at ``severity`` (1..5). ``image_side``: treat F = side^2 features as
    a square image for ``blur`` (None: 1-D signal). ``clip``: the valid input range (None for unbounded)."""
    if name not in SEVERITY:
        raise ValueError(f"corruption={name!r} is not supported; choose one of {list(CORRUPTIONS)}")
    if not isinstance(severity, int) or not 1 <= severity <= len(SEVERITY[name]):
        raise ValueError(f"severity must be an integer in [1, {len(SEVERITY[name])}], got {severity!r}")
    s = SEVERITY[name][severity - 1]
    lo, hi = clip

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, dtype=x.dtype).to(x.device)

    if name == "gaussian_noise":
        scale = (x.std() if lo is None else 1.0) * s
        out = x + scale * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    elif name == "impulse_noise":
        hit = rand(*x.shape) < s
        salt = rand(*x.shape) < 0.5
        lo_v = x.min() if lo is None else lo
        hi_v = x.max() if hi is None else hi
        out = torch.where(hit, torch.where(salt, torch.full_like(x, float(hi_v)), torch.full_like(x, float(lo_v))), x)
    elif name == "pixel_dropout":
        out = x * (rand(*x.shape) >= s).to(x.dtype)
    elif name == "contrast":
        m = x.mean(1, keepdim=True)
        out = m + s * (x - m)
    elif name == "translate":
        out = _translate(x, int(s), image_side)
    else:
        out = (1 - s) * x + s * _blur(x, image_side)
    return _clip(out, lo, hi)


def shortcut_features(y: Tensor, num_classes: int, agree: float, *, scale: float = 1.0,
                      generator: torch.Generator | None = None) -> Tensor:
    """A (B, num_classes) one-hot block that equals ``onehot(y)`` with probability ``agree`` and a uniformly
    drawn *other* class otherwise, times ``scale``. Training at ``agree=0.95`` and testing at ``agree=0`` is the
    shortcut-shift task (the spurious feature flipped)."""
    if not 0.0 <= agree <= 1.0:
        raise ValueError(f"agree must be in [0, 1], got {agree!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    keep = torch.rand(y.shape, generator=generator) < agree
    other = (y + torch.randint(1, num_classes, y.shape, generator=generator)) % num_classes
    cls = torch.where(keep, y, other)
    return F.one_hot(cls, num_classes).float() * scale


def expert_dropout(moe, p: float, *, generator: torch.Generator | None = None):
    """Expert dropout for a top-k softmax router, in training only: each forward, every expert is dropped
    with probability ``p`` (at least ``top_k`` stay), the router's softmax and top-k are taken over the
    remaining experts (gates renormalised as the router does). Implemented as a forward hook on
    ``moe.router`` that rebuilds the :class:`~moeparadigms.core.Routing` from its logits; returns the hook
    handle (``.remove()`` to switch it off)."""
    from ..core import Routing

    if not 0.0 <= p < 1.0:
        raise ValueError(f"expert dropout p must be in [0, 1), got {p!r}")
    k = moe.router.top_k

    def hook(router, _inp, r):
        if not router.training or p == 0 or r.logits_TE is None:
            return r
        E = r.logits_TE.shape[1]
        keep = torch.rand(E, generator=generator) >= p
        if int(keep.sum()) < k:
            keep[torch.randperm(E, generator=generator)[:k]] = True
        logits = r.logits_TE.masked_fill(~keep.to(r.logits_TE.device), float("-inf"))
        probs = torch.softmax(logits, -1)
        w, ids = torch.topk(probs, k, dim=-1)
        if router.renormalize:
            w = w / w.sum(-1, keepdim=True).clamp_min(1e-20)
        token_A = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(k)
        return Routing(token_A, ids.reshape(-1), w.reshape(-1), r.logits_TE, probs, ids_TK=ids, weights_TK=w)

    return moe.router.register_forward_hook(hook)


@torch.no_grad()
def accuracy(logits_fn: LogitsFn, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        correct += int((logits_fn(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
    return correct / max(1, x.shape[0])


def mean_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% Student-t confidence interval (0 for a single value)."""
    import statistics

    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 needs at least one value")
    mean = statistics.fmean(values)
    if n == 1:
        return mean, 0.0
    from scipy.stats import t

    return mean, float(t.ppf(0.975, n - 1) * statistics.stdev(values) / n ** 0.5)


__all__ = ["fgsm", "pgd", "corrupt", "CORRUPTIONS", "SEVERITY", "shortcut_features", "accuracy", "mean_ci95", "LogitsFn",
           "expert_dropout"]
