"""Does routing help? Each MoE method against controls built from the same network with routing removed or fixed,
paired by seed (issue 14).

Records (``--out``, ``benchmarks/results/controls.json``): ``{"paradigm", "benchmark", "method", "control", "seed",
"metric", "higher_is_better", "value"}`` (``control``: ``None`` for an MoE method, else the control's kind), plus
``wall_s``, ``active_params`` and ``total_params``. The summary (``effects``) is, per benchmark and MoE method,
"routing effect = MoE - best control" with the 95% bootstrap interval of the seed-paired difference and a verdict
(:mod:`moeparadigms.benchmarks.stats`); RL adds each method's interquartile mean with rliable's stratified-bootstrap
interval. The JSON is rewritten after every run, so a stopped run keeps what it finished (``--resume`` skips
the runs an earlier --out already holds).

Paradigms so far:

* ``rl``: PPO on CartPole-v1 and Acrobot-v1 (SB3 zoo settings, 100k steps, 10 seeds), metric: final return (mean
  of the last 20 episodes). ``ppo-moe`` (residual top-2 of 4 experts) against ``ppo-moe-dense-trunk`` (the same
  block with one always-on expert of the active size; ``dense-same-trunk``) and ``ppo-moe-hash`` (the same experts
  under a fixed hash router; ``moe-fixed-routing``); ``ppo-soft-moe`` against Sokar et al.'s
  ``ppo-soft-moe-one-expert`` (same tokenisation and slots, one expert of the four's parameters;
  ``single-scaled-expert``). The methods are defined in ``scripts/bench_rl.py``.

    python scripts/bench_controls.py --out benchmarks/results/controls.json
    python scripts/bench_controls.py --quick --out /tmp/controls.json      # smoke run (seconds)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_rl  # noqa: E402  (the RL methods, the zoo settings and one run)

from moeparadigms.benchmarks.stats import effects_table, rl_aggregate, routing_effect  # noqa: E402

CONTROL_KIND = {"ppo-moe-dense-trunk": "dense-same-trunk", "ppo-moe-hash": "moe-fixed-routing",
                "ppo-soft-moe-one-expert": "single-scaled-expert"}
RL_METHODS = bench_rl.CONTROL_METHODS  # each MoE method followed by its controls


def rl_record(rec: dict) -> dict:
    return {"paradigm": "rl", "benchmark": rec["env"], "method": rec["method"], "control": CONTROL_KIND.get(rec["method"]),
            "seed": rec["seed"], "metric": "final_return", "higher_is_better": True, "value": rec["final_return"],
            "wall_s": rec["wall_s"], "active_params": rec["active_params"], "steps": rec["steps"]}


def summarise(records: list[dict]) -> dict:
    effects, iqm = [], {}
    for (paradigm, bench, metric) in dict.fromkeys((r["paradigm"], r["benchmark"], r["metric"]) for r in records):
        recs = [r for r in records if (r["paradigm"], r["benchmark"], r["metric"]) == (paradigm, bench, metric)
                and r["value"] is not None]
        groups = bench_rl.CONTROLS if paradigm == "rl" else {}
        for method, controls in groups.items():
            mine = [r for r in recs if r["method"] in (method, *controls)]
            try:
                effects.append(routing_effect(mine, method=method, controls=list(controls)))
            except ValueError as e:  # too few paired seeds so far: say so
                print(f"{bench}/{method}: {e}", file=sys.stderr)
        if paradigm == "rl":
            scores = {}
            for m in dict.fromkeys(r["method"] for r in recs):
                v = [r["value"] for r in recs if r["method"] == m]
                if len(v) >= 2:
                    scores[m] = [[x] for x in v]
            if scores:
                iqm[bench] = {m: dict(zip(("iqm", "ci_low", "ci_high"), v)) for m, v in rl_aggregate(scores).items()}
    return {"effects": [e.as_dict() for e in effects], "iqm": iqm, "markdown": effects_table(effects, digits=1)}


def write(path: Path, records: list[dict], **meta) -> dict:
    summary = summarise(records)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({**meta, **summary, "records": records}, indent=1) + "\n")
    tmp.replace(path)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="CartPole, 1,000 steps, 2 seeds: a smoke run")
    ap.add_argument("--paradigms", nargs="+", default=["rl"], choices=["rl"])
    ap.add_argument("--envs", nargs="+", default=["CartPole-v1", "Acrobot-v1"], choices=["CartPole-v1", "Acrobot-v1"])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=list(RL_METHODS), choices=list(RL_METHODS))
    ap.add_argument("--resume", action="store_true", help="keep the records --out already holds and run the rest")
    args = ap.parse_args()
    envs, seeds, steps = (["CartPole-v1"], 2, 1_000) if args.quick else (args.envs, args.seeds, None)
    jobs = [dict(env=e, seed=s, method=m, steps=steps or bench_rl.STEPS[e])
            for e in envs for s in range(seeds) for m in args.methods]  # methods interleaved per seed: same load
    records: list[dict] = []
    if args.resume and args.out.is_file():
        records = json.loads(args.out.read_text())["records"]
        done = {(r["benchmark"], r["method"], r["seed"], r["steps"]) for r in records}
        jobs = [j for j in jobs if (j["env"], j["method"], j["seed"], j["steps"]) not in done]
    import logging
    import warnings

    import pytorch_lightning  # noqa: F401  (it sets its logger's level on import: import it first)
    from rich.progress import track

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)  # no per-run "Trainer.fit stopped" lines
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")  # Lightning's own

    t0 = time.perf_counter()
    cmd = " ".join(["python", "scripts/bench_controls.py", *sys.argv[1:]])
    for job in track(jobs, description="controls"):
        records.append(rl_record(bench_rl.run_one(job)))
        summary = write(args.out, records, command=cmd, wall_s=time.perf_counter() - t0)
    summary = write(args.out, records, command=cmd, wall_s=time.perf_counter() - t0)
    print(summary["markdown"])
    for bench, per in summary["iqm"].items():
        for m, v in per.items():
            print(f"{bench} {m}: IQM {v['iqm']:.1f} [{v['ci_low']:.1f}, {v['ci_high']:.1f}]")


if __name__ == "__main__":
    main()
