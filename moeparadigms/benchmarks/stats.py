"""Paired statistics for "does routing help?": every benchmark answers it the same way.

A benchmark runs the MoE method and its controls (the same network with routing removed or fixed) on the same
seeds. :func:`routing_effect` pairs them by seed, picks the best control (by its mean over the paired seeds),
and reports ``MoE - best control`` with a 95% percentile-bootstrap confidence interval of the mean paired
difference, and a verdict: ``helps`` / ``hurts`` when the interval excludes zero (in the direction the metric
prefers), ``no evidence`` otherwise. :func:`rl_aggregate` gives RL's interquartile mean with stratified-bootstrap
intervals from `rliable <https://github.com/google-research/rliable>`_ (Agarwal et al., NeurIPS 2021).

Records (``benchmarks/results/controls.json``) are plain dicts::

    {"paradigm", "benchmark", "method", "control", "seed", "metric", "higher_is_better", "value"}

where ``control`` is ``None`` for the method under test and the control's kind (``"dense-same-trunk"``,
``"moe-fixed-routing"``, ``"moe-task-only"``, ...) for a control.

Choosing the best control on the same seeds the difference is computed on favours the controls slightly (a
winner's curse); the verdict is therefore conservative for "helps".
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

Verdict = Literal["helps", "hurts", "no evidence"]
RECORD_FIELDS = ("paradigm", "benchmark", "method", "control", "seed", "metric", "higher_is_better", "value")


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = 10_000, level: float = 0.95,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean of the paired differences ``a[i] - b[i]`` and its percentile-bootstrap interval at ``level``.

    The seeds are resampled with replacement ``n_boot`` times (one generator seeded with ``seed``: the interval is
    deterministic). Needs at least 2 pairs."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired_bootstrap needs two 1-D sequences of one length, got shapes {x.shape} and {y.shape}")
    if len(x) < 2:
        raise ValueError(f"paired_bootstrap needs at least 2 paired seeds, got {len(x)}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be at least 100, got {n_boot}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired_bootstrap: values must be finite")
    d = x - y
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(d.mean()), float(lo), float(hi)


def bonferroni_level(m: int, level: float = 0.95) -> float:
    """The interval level that keeps the family-wise level ``level`` over ``m`` comparisons (Bonferroni): each
    interval at ``1 - (1 - level) / m``, so that the chance that any of the ``m`` excludes a true zero is at most
    ``1 - level``."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m (the number of comparisons) must be an int >= 1, got {m!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return 1 - (1 - level) / m


def verdict(lo: float, hi: float, higher_is_better: bool) -> Verdict:
    """``helps`` when the interval of ``MoE - control`` lies wholly on the metric's good side of zero, ``hurts``
    when wholly on the bad side, ``no evidence`` when it contains zero."""
    if lo > 0:
        return "helps" if higher_is_better else "hurts"
    if hi < 0:
        return "hurts" if higher_is_better else "helps"
    return "no evidence"


@dataclass(frozen=True)
class Effect:
    """``MoE - best control`` on one (paradigm, benchmark, metric)."""

    paradigm: str
    benchmark: str
    metric: str
    higher_is_better: bool
    method: str
    control: str  # the best control's method name
    seeds: tuple[int, ...]
    method_mean: float
    control_mean: float
    diff: float
    ci_low: float
    ci_high: float
    controls: dict[str, float]  # every control's mean over the paired seeds

    @property
    def verdict(self) -> Verdict:
        return verdict(self.ci_low, self.ci_high, self.higher_is_better)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seeds": list(self.seeds), "verdict": self.verdict}


def _check_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    out = list(records)
    for i, r in enumerate(out):
        missing = [f for f in RECORD_FIELDS if f not in r]
        if missing:
            raise ValueError(f"record {i} lacks {missing}; a record has the fields {list(RECORD_FIELDS)}")
    return out


def routing_effect(records: Iterable[Mapping[str, Any]], *, method: str, controls: Sequence[str] | None = None,
                   n_boot: int = 10_000, level: float = 0.95, seed: int = 0) -> Effect:
    """The routing effect of ``method`` against the best of its controls, paired by seed.

    ``records`` hold one (paradigm, benchmark, metric); ``controls`` names the control methods (default: every
    record whose ``control`` is not None). Only seeds that every compared method ran are used."""
    recs = _check_records(records)
    keys = {(r["paradigm"], r["benchmark"], r["metric"], bool(r["higher_is_better"])) for r in recs}
    if len(keys) != 1:
        raise ValueError(f"routing_effect needs the records of one paradigm/benchmark/metric, got {sorted(keys)}")
    (paradigm, benchmark, metric, hib), = keys
    by_method: dict[str, dict[int, float]] = {}
    for r in recs:
        seeds = by_method.setdefault(r["method"], {})
        if int(r["seed"]) in seeds:
            raise ValueError(f"{benchmark}: method {r['method']!r} has seed {r['seed']} twice")
        seeds[int(r["seed"])] = float(r["value"])
    if method not in by_method:
        raise ValueError(f"{benchmark}: no records of method {method!r}; methods: {sorted(by_method)}")
    if controls is None:
        controls = sorted({r["method"] for r in recs if r["control"] is not None})
    missing = [c for c in controls if c not in by_method]
    if not controls or missing:
        raise ValueError(f"{benchmark}: controls {list(controls)} not all in the records (missing {missing}); "
                         f"methods: {sorted(by_method)}")
    common = sorted(set(by_method[method]).intersection(*(by_method[c] for c in controls)))
    if len(common) < 2:
        raise ValueError(f"{benchmark}: {method!r} and its controls share {len(common)} seed(s); at least 2 are needed")
    means = {c: float(np.mean([by_method[c][s] for s in common])) for c in controls}
    best = (max if hib else min)(controls, key=lambda c: means[c])
    a = [by_method[method][s] for s in common]
    diff, lo, hi = paired_bootstrap(a, [by_method[best][s] for s in common], n_boot=n_boot, level=level, seed=seed)
    return Effect(paradigm, benchmark, metric, hib, method, best, tuple(common), float(np.mean(a)), means[best],
                  diff, lo, hi, means)


def fmt(x: float, digits: int = 3) -> str:
    """A table value: ``digits`` decimals, or 3 significant digits in exponent form when ``|x| >= 1e6`` (a diverged
    run's 8.5e21 would otherwise print as 22 digits)."""
    return f"{x:.3g}" if abs(x) >= 1e6 else f"{x:.{digits}f}"


def effects_table(effects: Sequence[Effect], digits: int = 3) -> str:
    """The "Does routing help?" table (markdown)."""
    rows = ["| paradigm | benchmark | metric | MoE | best control | MoE - control [95% CI] | seeds | verdict |",
            "|---|---|---|---|---|---|---|---|"]
    for e in effects:
        m, c, d, lo, hi = (fmt(x, digits) for x in (e.method_mean, e.control_mean, e.diff, e.ci_low, e.ci_high))
        rows.append(f"| {e.paradigm} | {e.benchmark} | {e.metric} ({'higher' if e.higher_is_better else 'lower'} is "
                    f"better) | {e.method}: {m} | {e.control}: {c} | {d} [{lo}, {hi}] | {len(e.seeds)} | {e.verdict} |")
    return "\n".join(rows)


def rl_aggregate(scores: Mapping[str, np.ndarray], *, reps: int = 2000, level: float = 0.95,
                 seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """Interquartile mean and its stratified-bootstrap interval per method, with rliable.

    ``scores[method]`` is ``[runs, tasks]`` (normalised returns when tasks differ in scale). Needs ``rliable``
    (``pip install moeparadigms[rl]``)."""
    try:
        from rliable import library as rly
        from rliable import metrics
    except ImportError as e:  # pragma: no cover - rliable is in the rl extra
        raise ImportError("rl_aggregate needs rliable: pip install 'moeparadigms[rl]'") from e
    arrays = {}
    for m, s in scores.items():
        a = np.asarray(s, dtype=np.float64)
        if a.ndim != 2 or a.shape[0] < 2:
            raise ValueError(f"scores[{m!r}] must be [runs >= 2, tasks], got shape {a.shape}")
        arrays[m] = a
    state = np.random.get_state()  # rliable's stratified resampling draws from numpy's global generator
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():  # arch's notice about its own RandomState argument, which rliable passes
            warnings.filterwarnings("ignore", message="random_state is deprecated", category=FutureWarning)
            point, ci = rly.get_interval_estimates(arrays, lambda x: np.array([metrics.aggregate_iqm(x)]),
                                                   reps=reps, confidence_interval_size=level,
                                                   random_state=np.random.RandomState(seed))
    finally:
        np.random.set_state(state)
    return {m: (float(point[m][0]), float(ci[m][0, 0]), float(ci[m][1, 0])) for m in arrays}


__all__ = ["RECORD_FIELDS", "Effect", "Verdict", "effects_table", "paired_bootstrap", "rl_aggregate",
           "routing_effect", "verdict"]
