"""The MoE as an Avalanche DynamicModule inside Avalanche's own strategies (no Lightning)."""
import pytest
import torch
from avalanche.training import LwF, Naive, Replay
from avalanche.training.plugins import EvaluationPlugin

from moeparadigms.benchmarks.continual import SplitDigits
from moeparadigms.core import MLPExperts, MoE, TopKRouter
from moeparadigms.integrations.avalanche import AvalancheMoE, MoELossPlugin


def _model():
    moe = MoE(router=TopKRouter(d_model=32, num_experts=2, top_k=1), experts=MLPExperts(d_model=32, hidden=32, num_experts=2))
    return AvalancheMoE(in_features=64, num_classes=10, moe=moe, experts_per_experience=1)


@pytest.mark.parametrize("strategy_cls", [Naive, Replay, LwF])
def test_grows_in_training_only_and_trains_new_experts(strategy_cls):
    dm = SplitDigits(n_experiences=5, seed=0)
    dm.setup()
    model = _model()
    extra = {"mem_size": 50} if strategy_cls is Replay else {"alpha": 1.0, "temperature": 2.0} if strategy_cls is LwF else {}
    plugin = MoELossPlugin()
    calls = []
    orig = plugin.before_backward
    plugin.before_backward = lambda s, **kw: (calls.append(float(s.model.last_aux_loss.detach())), orig(s, **kw))  # type: ignore[method-assign]
    strategy = strategy_cls(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=3e-3), criterion=torch.nn.CrossEntropyLoss(),
                            train_mb_size=64, train_epochs=1, eval_mb_size=512, plugins=[plugin],
                            evaluator=EvaluationPlugin(loggers=[]), **extra)
    stream = dm.benchmark.train_stream
    strategy.train(stream[0])
    strategy.eval(dm.benchmark.test_stream)  # adaptation before evaluation must not grow
    moe = model.net.moe_layers()[0]
    assert moe.num_experts == 2
    before = moe.experts.w1.full().detach().clone()
    strategy.train(stream[1])
    assert moe.num_experts == 3
    after = moe.experts.w1.full().detach()
    assert torch.equal(before, after[:2])  # old experts frozen, bit-identical
    opt_params = {id(p) for g in strategy.optimizer.param_groups for p in g["params"]}
    assert id(moe.experts.w1.blocks[-1]) in opt_params  # Avalanche's optimizer got the new expert
    assert calls and all(c > 0 for c in calls)  # the plugin added the MoE loss on every step


def test_bad_input():
    with pytest.raises(ValueError, match="experts_per_experience must be an integer >= 0, got -1"):
        AvalancheMoE(in_features=4, num_classes=2, moe=_model().net.moe_layers()[0], experts_per_experience=-1)
