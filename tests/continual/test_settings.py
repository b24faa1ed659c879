"""Each continual setting learns a tiny stream past a threshold in seconds, and bad settings fail clearly."""
import pytest

from moeparadigms.benchmarks.continual import AvalancheStream, PermutedDigits, SplitDigits
from moeparadigms.core import MLPExperts, MoE, TopKRouter
from moeparadigms.paradigms.continual import ContinualMoE, ExpertPerExperience, FixedExperts, GrowOnDemand

from .helpers import growth_model, trainer


@pytest.mark.parametrize(
    ("dm", "threshold"),
    [
        (SplitDigits(setting="class-incremental", epochs_per_experience=2, batch_size=32), 0.9),
        (SplitDigits(setting="task-incremental", epochs_per_experience=2, batch_size=32), 0.95),
        (PermutedDigits(setting="domain-incremental", n_experiences=2, epochs_per_experience=2, batch_size=32), 0.9),
    ],
    ids=["class-incremental", "task-incremental", "domain-incremental"],
)
def test_setting_learns_tiny_stream(dm, threshold):
    m = growth_model()
    trainer(dm).fit(m, dm)
    out = m.acc_matrix.compute()
    assert out["avg_acc"] > threshold, out["matrix"]
    assert out["forgetting"] < 0.05  # frozen paths + task inference: (almost) nothing forgotten
    assert m.moe.num_experts == dm.num_experiences


def test_fixed_baseline_forgets_in_class_incremental():
    """The fixed-size MoE (shared router and experts, nothing frozen) is the ablation growth must beat."""
    dm = SplitDigits(setting="class-incremental", epochs_per_experience=2, batch_size=32)
    moe = MoE(router=TopKRouter(d_model=32, num_experts=5, top_k=2), experts=MLPExperts(d_model=32, hidden=32, num_experts=5))
    fixed = ContinualMoE(moe=moe, growth=FixedExperts(), lr=3e-3)
    trainer(dm).fit(fixed, dm)
    grown = growth_model()
    trainer(dm).fit(grown, dm)
    assert fixed.moe.num_experts == 5
    g, f = grown.acc_matrix.compute(), fixed.acc_matrix.compute()
    print({k: (float(g[k]), float(f[k])) for k in ("avg_acc", "forgetting")})
    assert f["forgetting"] > g["forgetting"] + 0.01, (g, f)


def test_grow_on_demand_reuses_a_path_that_already_fits():
    # the same permutation twice: the second experience is solved by the first path, so no expert is added
    dm = PermutedDigits(setting="domain-incremental", n_experiences=2, epochs_per_experience=2, batch_size=32)
    dm.setup()
    dm.train_sets[1], dm.test_sets[1] = dm.train_sets[0], dm.test_sets[0]
    m = growth_model(growth=GrowOnDemand(threshold=0.5))
    trainer(dm).fit(m, dm)
    assert m.moe.num_experts == 1 and m.growth.last_scores[0] < 0.5
    assert bool(m.moe.router.allowed[1, 0])


def test_bad_input_names_field_value_and_choices():
    with pytest.raises(ValueError, match="setting='sideways'.*class-incremental"):
        SplitDigits(setting="sideways")
    with pytest.raises(ValueError, match="n_experiences must divide"):
        SplitDigits(n_experiences=3)
    with pytest.raises(ValueError, match="epochs_per_experience must be an integer >= 1, got 0"):
        SplitDigits(epochs_per_experience=0)
    with pytest.raises(ValueError, match="domain-incremental"):
        SplitDigits(setting="domain-incremental")
    with pytest.raises(ValueError, match="benchmark is required"):
        AvalancheStream()
    with pytest.raises(ValueError, match="cannot be imported"):
        AvalancheStream(benchmark="avalanche.benchmarks.classic.NoSuchBenchmark").setup()
    moe = MoE(router=TopKRouter(d_model=8, num_experts=2, top_k=1), experts=MLPExperts(d_model=8, hidden=8, num_experts=2))
    with pytest.raises(ValueError, match="needs moe.router to be an ExperienceRouter"):
        ContinualMoE(moe=moe, growth=ExpertPerExperience())
    with pytest.raises(ValueError, match="replay_size must be an integer >= 0"):
        growth_model(replay_size=-1)
    with pytest.raises(ValueError, match="signal='noise'"):
        GrowOnDemand(signal="noise")
    with pytest.raises(ValueError, match="init='zeros'"):
        ExpertPerExperience(init="zeros")


def test_trainer_must_match_the_stream():
    dm = SplitDigits(epochs_per_experience=1)
    m = growth_model()
    with pytest.raises(ValueError, match="trainer.max_epochs=3 but the stream needs 5"):
        _fit_with(dm, m, max_epochs=3)


def _fit_with(dm, m, **kw):
    import pytorch_lightning as pl

    pl.Trainer(reload_dataloaders_every_n_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False, **kw).fit(m, dm)
