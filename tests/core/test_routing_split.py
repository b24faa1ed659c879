"""core/routing.py was split (router_base.py holds the routing results and the Router base): every name it had
still imports from it, and the class paths recorded in configs and checkpoints still rebuild the routers."""
from __future__ import annotations

import importlib

import pytest

from moeparadigms import core
from moeparadigms._config import plain_config
from moeparadigms.core import router_base, routing

BEFORE_SPLIT = ["Routing", "SoftRouting", "Router", "TopKRouter", "SwitchRouter", "BiasBalancedRouter",
                "TaskConditionedRouter", "ExpertChoiceRouter", "HashRouter", "SoftMoERouter"]


@pytest.mark.parametrize("name", BEFORE_SPLIT)
def test_names_still_import_from_routing_and_core(name):
    assert getattr(routing, name) is getattr(core, name)
    if name in ("Routing", "SoftRouting", "Router"):
        assert getattr(router_base, name) is getattr(routing, name)


@pytest.mark.parametrize("name", [n for n in BEFORE_SPLIT if n.endswith("Router") and n != "Router"])
def test_recorded_class_path_rebuilds_the_router(name):
    kw = {"num_tasks": 2} if name == "TaskConditionedRouter" else {}
    r = getattr(core, name)(d_model=4, num_experts=2, **kw)
    cfg = plain_config(r)
    assert cfg["class_path"] == f"moeparadigms.core.routing.{name}"
    module, cls = cfg["class_path"].rsplit(".", 1)
    rebuilt = getattr(importlib.import_module(module), cls)(**cfg["init_args"])
    assert type(rebuilt) is type(r) and rebuilt.num_experts == 2
