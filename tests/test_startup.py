"""Start-up: ``moeparadigms --help`` loads no deep-learning stack, and scripts/measure_startup.py runs (1 repetition).

The times themselves are not asserted here (they depend on the machine and its load); the full measurement
(median of 7) is committed in benchmarks/results/startup.json. What is asserted does not depend on load: which
packages a command imports.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "measure_startup.py"
# what `moeparadigms --help` must not import: each costs seconds (torch alone 2-5 s on these machines)
NOT_FOR_HELP = {"torch", "pytorch_lightning", "lightning", "lightning_fabric", "torchmetrics", "jsonargparse"}


def _imported_by(code: str) -> tuple[set[str], str]:
    probe = f"import sys\n{code}\nprint('\\nMODULES', ' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=REPO.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    head, _, modules = r.stdout.rpartition("\nMODULES ")
    return set(modules.split()), head


def test_probe_sees_a_heavy_import():  # the check below can fail: the probe does see torch when it is imported
    modules, _ = _imported_by("import torch")
    assert "torch" in modules


def test_help_imports_no_deep_learning_stack():
    # the console script's entry point (moeparadigms.cli:main), run as `moeparadigms --help` runs it
    modules, out = _imported_by("from moeparadigms.cli import main\nmain(['--help'])")
    assert "usage: moeparadigms" in out
    assert not modules & NOT_FOR_HELP, f"moeparadigms --help imported {sorted(modules & NOT_FOR_HELP)}"


def test_core_import_leaves_torchmetrics_for_later():
    """``import moeparadigms.core`` stays torch only: torchmetrics (and the torchvision it drags in) load when
    ``RoutingMetrics`` is first used."""
    modules, out = _imported_by("import moeparadigms.core as c\nprint(c.MoE.__name__)")
    assert "MoE" in out and "torch" in modules
    assert not modules & {"torchmetrics", "torchvision", "pytorch_lightning"}, sorted(modules & {"torchmetrics", "torchvision"})
    modules, _ = _imported_by("from moeparadigms.core import RoutingMetrics")
    assert "torchmetrics" in modules


def test_measure_startup_quick_writes_the_record(tmp_path: Path):
    spec = importlib.util.spec_from_file_location("measure_startup", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "startup.json"
    mod.main(["--quick", "--out", str(out)])
    rec = json.loads(out.read_text())
    assert rec["repeats"] == 1 and rec["machine"]["cpus"] >= 1
    by_name = {r["name"]: r for r in rec["results"]}
    assert set(by_name) == {"python -c pass", "moeparadigms --help", "import moeparadigms", "import moeparadigms.core",
                            "import torch"}
    for r in rec["results"]:
        assert len(r["times_s"]) == 1 and r["median_s"] == r["times_s"][0] > 0
        assert (r["met"] is None) == (r["target_s"] is None)
        if r["met"] is not None:
            assert r["met"] == (r["median_s"] < r["target_s"])
    assert by_name["moeparadigms --help"]["target_s"] == 1.5 and by_name["import moeparadigms.core"]["target_s"] == 4.0
    assert "torch" in by_name["import moeparadigms.core"]["heavy_imports"]  # the probe reports what it should
    assert by_name["python -c pass"]["median_s"] < by_name["import torch"]["median_s"]
