"""The shared statistics of "does routing help?" (moeparadigms.benchmarks.stats) against plain references."""
from __future__ import annotations

import numpy as np
import pytest

from moeparadigms.benchmarks.stats import (
    bonferroni_level,
    effects_table,
    fmt,
    paired_bootstrap,
    rl_aggregate,
    routing_effect,
    verdict,
)


def _records(values: dict[str, list[float]], controls: set[str], higher: bool = True) -> list[dict]:
    return [{"paradigm": "p", "benchmark": "b", "method": m, "control": m if m in controls else None, "seed": s,
             "metric": "acc", "higher_is_better": higher, "value": v}
            for m, vs in values.items() for s, v in enumerate(vs)]


def test_paired_bootstrap_against_a_plain_loop():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 1.0, 12), rng.normal(0.0, 1.0, 12)
    mean, lo, hi = paired_bootstrap(a, b, n_boot=2000, seed=3)
    d = a - b
    ref_rng = np.random.default_rng(3)
    idx = ref_rng.integers(0, 12, size=(2000, 12))
    boots = np.array([d[i].mean() for i in idx])
    assert mean == pytest.approx(d.mean())
    assert (lo, hi) == pytest.approx(tuple(np.quantile(boots, [0.025, 0.975])))
    assert lo < mean < hi
    assert paired_bootstrap(a, b, n_boot=2000, seed=3) == (mean, lo, hi)  # deterministic under its seed


def test_pairing_matters_and_a_constant_difference_has_no_width():
    base = np.linspace(0, 10, 8)  # large seed-to-seed spread, tiny consistent gain
    assert paired_bootstrap(base + 0.1, base) == pytest.approx((0.1, 0.1, 0.1))
    mean, lo, hi = paired_bootstrap(base + 0.1 + np.array([0.01, -0.01] * 4), base)
    assert lo > 0  # paired: the gain is clear although the seeds' spread is 100x larger


def test_verdicts_follow_the_metric_direction():
    assert verdict(0.1, 0.3, True) == "helps" and verdict(0.1, 0.3, False) == "hurts"
    assert verdict(-0.3, -0.1, True) == "hurts" and verdict(-0.3, -0.1, False) == "helps"
    assert verdict(-0.1, 0.1, True) == "no evidence"


def test_routing_effect_picks_the_best_control_on_the_common_seeds():
    recs = _records({"moe": [0.90, 0.91, 0.92, 0.93, 0.94],
                     "dense-same-trunk": [0.80, 0.81, 0.82, 0.83, 0.84],
                     "moe-fixed-routing": [0.85, 0.86, 0.87, 0.88]},  # seed 4 missing: dropped for all
                    {"dense-same-trunk", "moe-fixed-routing"})
    e = routing_effect(recs, method="moe", n_boot=500)
    assert e.control == "moe-fixed-routing" and e.seeds == (0, 1, 2, 3)
    assert e.diff == pytest.approx(0.05) and e.verdict == "helps"
    assert e.method_mean == pytest.approx(0.915) and e.controls["dense-same-trunk"] == pytest.approx(0.815)
    assert "| p | b | acc (higher is better) | moe: 0.915 | moe-fixed-routing: 0.865 |" in effects_table([e])
    # lower is better: the best control is the lowest, and a lower MoE value helps
    low = routing_effect(_records({"moe": [1.0, 1.1, 1.2], "c1": [2.0, 2.1, 2.2], "c2": [1.5, 1.6, 1.7]}, {"c1", "c2"},
                                  higher=False), method="moe", n_boot=500)
    assert low.control == "c2" and low.diff == pytest.approx(-0.5) and low.verdict == "helps"


def test_bonferroni_widens_the_interval_and_can_overturn_a_verdict():
    assert bonferroni_level(1) == pytest.approx(0.95) and bonferroni_level(10) == pytest.approx(0.995)
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.6, 1.0, 10), rng.normal(0.0, 1.0, 10)
    _, lo, hi = paired_bootstrap(a, b, seed=1)
    _, lo5, hi5 = paired_bootstrap(a, b, seed=1, level=bonferroni_level(5))
    _, lo20, hi20 = paired_bootstrap(a, b, seed=1, level=bonferroni_level(20))
    assert lo20 <= lo5 <= lo and hi <= hi5 <= hi20  # the same resamples, wider quantiles
    # a difference that is clear alone but not over 20 comparisons (5 seeds, noisy gain)
    recs = _records({"moe": [1.0, 1.3, 0.9, 1.4, 1.1], "c": [0.9, 0.8, 1.0, 0.95, 0.85]}, {"c"})
    one, many = (routing_effect(recs, method="moe", level=lvl) for lvl in (0.95, bonferroni_level(20)))
    assert one.verdict == "helps" and many.verdict == "no evidence" and many.diff == one.diff
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="m \\(the number of comparisons\\)"):
            bonferroni_level(bad)


def test_routing_effect_refuses_what_it_cannot_pair():
    with pytest.raises(ValueError, match="at least 2"):
        routing_effect(_records({"moe": [1.0], "c": [0.5]}, {"c"}), method="moe")
    with pytest.raises(ValueError, match="no records of method 'topk'"):
        routing_effect(_records({"moe": [1.0, 2.0], "c": [0.5, 0.6]}, {"c"}), method="topk")
    with pytest.raises(ValueError, match="one paradigm/benchmark/metric"):
        routing_effect(_records({"moe": [1.0, 2.0]}, set()) + [dict(_records({"c": [1.0]}, {"c"})[0], benchmark="x")],
                       method="moe")
    with pytest.raises(ValueError, match="lacks"):
        routing_effect([{"method": "moe"}], method="moe")
    with pytest.raises(ValueError, match="seed 0 twice"):
        routing_effect(_records({"moe": [1.0, 2.0], "c": [0.5, 0.6]}, {"c"}) * 2, method="moe")
    with pytest.raises(ValueError, match="finite"):
        paired_bootstrap([1.0, float("nan")], [0.0, 0.0])


def test_rl_aggregate_is_rliables_iqm_with_a_deterministic_interval():
    pytest.importorskip("rliable")
    rng = np.random.default_rng(0)
    scores = {"ppo-moe": rng.normal(1.0, 0.2, (10, 2)), "ppo-dense": rng.normal(0.5, 0.2, (10, 2))}
    out = rl_aggregate(scores, reps=500)
    for m, s in scores.items():
        flat = np.sort(s.ravel())
        assert out[m][0] == pytest.approx(flat[5:15].mean())  # IQM of 20 values: the middle 10
        assert out[m][1] < out[m][0] < out[m][2]
    assert rl_aggregate(scores, reps=500) == out
    with pytest.raises(ValueError, match="runs >= 2"):
        rl_aggregate({"x": np.ones(5)})


def test_table_values_switch_to_exponent_form_when_huge():
    assert fmt(0.12345) == "0.123" and fmt(0.12345, 1) == "0.1" and fmt(-12.5, 1) == "-12.5"
    assert fmt(8.517736e21) == "8.52e+21" and fmt(-2.5e6, 4) == "-2.5e+06" and fmt(999_999.0, 1) == "999999.0"
