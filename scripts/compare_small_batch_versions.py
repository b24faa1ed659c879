"""Before/after for issue 15: the default MoE layer against the dense MLP of equal active parameters, timed the
way bench_small_batch.py times (interleaved, medians, one thread), for whichever ``moeparadigms`` is importable.
Run it once against an older checkout and once against this one, e.g.

    git archive d7c44dc moeparadigms | tar -x -C /tmp/old
    PYTHONPATH=/tmp/old python scripts/compare_small_batch_versions.py /tmp/before.json
    python scripts/compare_small_batch_versions.py /tmp/after.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_small_batch import _interleaved, _mlp, _step  # noqa: E402


def main() -> None:
    from moeparadigms.core import MLPExperts, MoE, TopKRouter

    torch.set_num_threads(1)
    out = []
    for d, h, e, k in [(64, 64, 4, 2), (64, 32, 4, 1)]:
        torch.manual_seed(0)
        moe = MoE(router=TopKRouter(d_model=d, num_experts=e, top_k=k), experts=MLPExperts(d_model=d, hidden=h, num_experts=e))
        mlp = _mlp(d, h, k)
        for t in [8, 64, 256]:
            x = torch.randn(t, d, requires_grad=True)
            row = {"shape": [d, h, e, k], "tokens": t}
            for p in ("forward", "train"):
                m = _interleaved({"moe": lambda p=p: _step(moe, x, p), "mlp": lambda p=p: _step(mlp, x, p)}, 100, 3, 2)  # noqa: B023 (timed at once)
                row[f"{p}_ratio"] = m["moe"] / m["mlp"]
            print(row, flush=True)
            out.append(row)
    Path(sys.argv[1]).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
