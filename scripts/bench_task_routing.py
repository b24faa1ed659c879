"""Task-MoE training step on a batch whose samples carry task ids: per-sample task routing against running
every sample once per task and masking (what ``TaskMoENet.forward`` did before), side by side.

Both methods use the same ``MultiTaskMoE`` (the ``configs/multitask/task_moe.yaml`` sizes, T tasks), the same
batches and the same optimizer kind; each step is forward, the fixed-weight task losses plus the aux loss,
backward and an optimizer step. The methods alternate within every repeat (the machine is noisy); the JSON holds
the median microseconds per step of each and their ratio.

    python scripts/bench_task_routing.py --out benchmarks/results/task_routing.json
    python scripts/bench_task_routing.py --quick --out /tmp/task_routing.json
"""
from __future__ import annotations

import argparse
import json
import statistics as st
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moeparadigms.paradigms.multitask import MultiTaskMoE, TaskMoE, TaskSpec


def build(num_tasks: int, in_features: int, depth: int, seed: int) -> MultiTaskMoE:
    torch.manual_seed(seed)
    tasks = [TaskSpec(name=f"task{t}", kind="classification", num_classes=4) for t in range(num_tasks)]
    arch = TaskMoE(d_model=32, num_experts=8, expert_hidden=21, top_k=2, depth=depth, conditioning="concat", task_dim=8)
    return MultiTaskMoE(in_features=in_features, tasks=tasks, architecture=arch, tower_hidden=8, lr=3e-3)


def masked_loss(model: MultiTaskMoE, x: torch.Tensor, task_id: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The earlier way: every sample through the net once per task, every tower on every row, then masking."""
    out = model.net(x)
    total = out.aux_loss
    for t, (tower, r) in enumerate(zip(model.towers, out.reps, strict=True)):
        mask = task_id == t
        if mask.any():
            total = total + F.cross_entropy(tower(r)[mask], y[mask])
    return total


def per_sample_loss(model: MultiTaskMoE, x: torch.Tensor, task_id: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model.task_losses((x, task_id, y))[0].loss


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--quick", action="store_true", help="seconds: few steps, one batch size")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--depth", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    batches = [64] if args.quick else args.batches
    steps, repeats = (3, 3) if args.quick else (20, 15)
    F_IN = 100
    records = []
    for B in batches:
        g = torch.Generator().manual_seed(B)
        data = [(torch.randn(B, F_IN, generator=g), torch.randint(0, args.tasks, (B,), generator=g),
                 torch.randint(0, 4, (B,), generator=g)) for _ in range(steps)]
        runs = {}
        for name, loss_fn in (("all-tasks-masked", masked_loss), ("per-sample", per_sample_loss)):
            model = build(args.tasks, F_IN, args.depth, seed=0)
            opt = model.configure_optimizers()  # the module's own optimizer (AdamW)

            def step(loss_fn=loss_fn, model=model, opt=opt, data=data) -> None:
                for x, t, y in data:
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model, x, t, y).backward()
                    opt.step()

            step()  # warm-up (and the grouped-GEMM extension's first load)
            runs[name] = (step, [])
        for _ in range(repeats):
            for step, times in runs.values():
                t0 = time.perf_counter()
                step()
                times.append((time.perf_counter() - t0) / steps * 1e6)
        med = {name: st.median(times) for name, (_, times) in runs.items()}
        for name, (_, times) in runs.items():
            records.append({"benchmark": "task-moe-step", "method": name, "batch": B, "tasks": args.tasks,
                            "depth": args.depth, "us_per_step": med[name], "us_per_step_all": times,
                            "ratio_to_masked": med[name] / med["all-tasks-masked"]})
        print(f"B={B:5d} T={args.tasks}: all-tasks-masked {med['all-tasks-masked']:9.0f} us/step, per-sample "
              f"{med['per-sample']:9.0f} us/step, ratio {med['per-sample'] / med['all-tasks-masked']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
