#!/usr/bin/env python
"""Forward+backward time and peak memory of the MoE layer against a dense FFN of equal active FLOPs, a
naive per-expert loop, and the pip-installable peers, on the same tokens and shapes, in one run.

Two expert families are compared, each against its own dense equivalent (E experts of hidden h with
top-k do the FLOPs of one dense FFN of hidden k*h):

* MLP (GELU) experts: ``moeparadigms`` (dropless), ``moeparadigms-grouped`` (the same layer through the earlier
  per-GEMM grouped path instead of the fused per-expert kernel), ``moeparadigms-capacity`` (capacity factor 1.25),
  ``naive-loop`` (a per-expert loop indexing stacked weights), ``deepspeed`` (``deepspeed.moe.layer.MoE``,
  ``drop_tokens=False``), ``st-moe-pytorch`` (lucidrains, its default capacity factor 1.25 with the
  second-expert threshold disabled so every token gets k experts);
* GLU (SwiGLU) experts, because the Mixtral block only has those: ``moeparadigms-glu`` against
  ``transformers-mixtral-eager`` and ``transformers-mixtral-grouped_mm``.

Timing: all implementations of a configuration are built up front and run interleaved (one step of each
per round, order rotated every round) so machine noise hits all alike; after ``--warmup`` rounds the
median of ``--reps`` rounds is reported. A step is ``y = layer(x); y.backward(g)`` with a fixed random
upstream gradient ``g`` and gradients set to None before each step. Peak memory: each implementation
runs again in its own subprocess; ``peak_mb`` is the peak of live tensor bytes during one step above the
level before it, from torch.profiler's allocation events (``peak_rss_mb``, the resident-set view, is
kept beside it).

    python scripts/bench_core.py --out benchmarks/results/core_cpu.json            # full run
    python scripts/bench_core.py --quick --out /tmp/core.json                      # seconds-long smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moeparadigms.core import FFN, GLUExperts, MLPExperts, MoE, TopKRouter, grouped_ffn

MLP_IMPLS = ["dense", "moeparadigms", "moeparadigms-grouped", "moeparadigms-capacity", "naive-loop", "deepspeed", "st-moe-pytorch"]
GLU_IMPLS = ["dense-glu", "moeparadigms-glu", "transformers-mixtral-eager", "transformers-mixtral-grouped_mm"]
DENSE_OF = {i: "dense" for i in MLP_IMPLS} | {i: "dense-glu" for i in GLU_IMPLS}
CAPACITY_FACTOR = 1.25
SEQ_LEN = 1024


@dataclass(frozen=True)
class Shape:
    tokens: int
    d_model: int
    hidden: int
    E: int
    k: int
    device: str = "cpu"
    dtype: str = "float32"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


class Unavailable(Exception):
    """A peer library is not installed (or cannot run here); its rows are skipped with the reason."""


# ----------------------------------------------------------------------------------------------------
# Implementations: each builder returns (module, step) where step(x, g) runs one forward+backward
# ----------------------------------------------------------------------------------------------------
class NaiveLoopMoE(nn.Module):
    """The textbook loop: top-k softmax router, then for each expert index its tokens and its slice
    ``W[e]`` of stacked weights. Autograd's backward of ``W[e]`` allocates a zero gradient of the full
    stacked size for every expert, which is what makes this slow."""

    def __init__(self, s: Shape) -> None:
        super().__init__()
        self.k = s.k
        self.gate = nn.Linear(s.d_model, s.E, bias=False)
        self.w1 = nn.Parameter(torch.randn(s.E, s.d_model, s.hidden) / s.d_model**0.5)
        self.w2 = nn.Parameter(torch.randn(s.E, s.hidden, s.d_model) / s.hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.gate(x), dim=-1)
        w, ids = torch.topk(probs, self.k, dim=-1)
        if self.k > 1:
            w = w / w.sum(-1, keepdim=True)
        y = torch.zeros_like(x)
        for e in range(self.w1.shape[0]):
            tok, slot = torch.where(ids == e)
            if tok.numel():
                h = torch.nn.functional.gelu(x[tok] @ self.w1[e]) @ self.w2[e]
                y = y.index_add(0, tok, h * w[tok, slot, None])
        return y


def _ours(s: Shape, glu: bool, capacity: float | None) -> nn.Module:
    bank = (GLUExperts(d_model=s.d_model, hidden=s.hidden, num_experts=s.E, activation="silu") if glu
            else MLPExperts(d_model=s.d_model, hidden=s.hidden, num_experts=s.E, activation="gelu"))
    return MoE(router=TopKRouter(d_model=s.d_model, num_experts=s.E, top_k=s.k), experts=bank, capacity_factor=capacity)


def _mlp_expert(s: Shape) -> nn.Module:
    return nn.Sequential(nn.Linear(s.d_model, s.hidden, bias=False), nn.GELU(), nn.Linear(s.hidden, s.d_model, bias=False))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _deepspeed(s: Shape) -> nn.Module:
    try:
        import deepspeed
        from deepspeed.moe.layer import MoE as DSMoE
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"deepspeed not importable ({type(e).__name__}: {e}); pip install 'moeparadigms[bench]'") from e
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(key, value)
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if s.device.startswith("cuda") else "gloo", verbose=False)
    layer = DSMoE(hidden_size=s.d_model, expert=_mlp_expert(s), num_experts=s.E, ep_size=1, k=s.k,
                  drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
    layer.set_deepspeed_parallelism()
    return layer


def _st_moe(s: Shape) -> nn.Module:
    try:
        from st_moe_pytorch import MoE as STMoE
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"st-moe-pytorch not importable ({e}); pip install 'moeparadigms[bench]'") from e
    # its gate needs top_n >= 2: the second expert is taken when gate2 / gate1 exceeds the threshold, so a
    # tiny threshold always takes it (k = 2) and a huge one never does (k = 1)
    return STMoE(dim=s.d_model, num_experts=s.E, gating_top_n=2, threshold_train=1e-9 if s.k == 2 else 1e9,
                 capacity_factor_train=CAPACITY_FACTOR, experts=nn.ModuleList([_mlp_expert(s) for _ in range(s.E)]))


def _mixtral(s: Shape, impl: str) -> nn.Module:
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except Exception as e:  # noqa: BLE001
        raise Unavailable(f"transformers not importable ({e}); pip install 'moeparadigms[bench]'") from e
    cfg = MixtralConfig(hidden_size=s.d_model, intermediate_size=s.hidden, num_local_experts=s.E,
                        num_experts_per_tok=s.k, hidden_act="silu")
    cfg._experts_implementation = impl
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, s.d_model**-0.5)
    return block


def build(impl: str, s: Shape) -> tuple[nn.Module, Callable[[torch.Tensor, torch.Tensor], None]]:
    torch.manual_seed(0)
    if impl == "dense":
        m: nn.Module = FFN(d_model=s.d_model, hidden=s.k * s.hidden, activation="gelu")
    elif impl == "dense-glu":
        m = FFN(d_model=s.d_model, hidden=s.k * s.hidden, activation="silu", glu=True)
    elif impl == "moeparadigms":
        m = _ours(s, glu=False, capacity=None)
    elif impl == "moeparadigms-grouped":
        m = _ours(s, glu=False, capacity=None)
    elif impl == "moeparadigms-capacity":
        m = _ours(s, glu=False, capacity=CAPACITY_FACTOR)
    elif impl == "moeparadigms-glu":
        m = _ours(s, glu=True, capacity=None)
    elif impl == "naive-loop":
        m = NaiveLoopMoE(s)
    elif impl == "deepspeed":
        m = _deepspeed(s)
    elif impl == "st-moe-pytorch":
        m = _st_moe(s)
    elif impl.startswith("transformers-mixtral-"):
        m = _mixtral(s, impl.removeprefix("transformers-mixtral-"))
    else:
        raise ValueError(f"unknown impl {impl!r}; choose from {MLP_IMPLS + GLU_IMPLS}")
    m = m.to(device=s.device, dtype=s.torch_dtype)
    three_d = impl in ("deepspeed", "st-moe-pytorch") or impl.startswith("transformers-")
    params = list(m.parameters())

    fused = impl != "moeparadigms-grouped"
    # st-moe-pytorch builds its dispatch/combine tensors in float32 and relies on autocast to meet bf16 weights;
    # it runs under autocast in low precision (its matmuls then run in s.dtype like everyone else's)
    amp = (torch.autocast(torch.device(s.device).type, dtype=s.torch_dtype) if impl == "st-moe-pytorch" and s.dtype != "float32"
           else contextlib.nullcontext())

    def step(x: torch.Tensor, g: torch.Tensor) -> None:
        # the expert path is chosen per forward (the backward follows it); restored so nothing leaks out
        prev, grouped_ffn.FUSED = grouped_ffn.FUSED, fused
        try:
            for p in params:
                p.grad = None
            # the sequence-shaped peers get sequences of SEQ_LEN tokens (st-moe-pytorch routes, and sizes its
            # capacity, per sequence: one 8,192-token sequence would inflate its dense dispatch tensors)
            inp = x.view(-1, min(SEQ_LEN, x.shape[0]), x.shape[-1]) if three_d else x
            with amp:
                out = m(inp)
                y = out[0] if isinstance(out, tuple) else getattr(out, "y", getattr(out, "outputs", out))
            y.reshape(g.shape).to(g.dtype).backward(g)
            if s.device.startswith("cuda"):
                torch.cuda.synchronize()
        finally:
            grouped_ffn.FUSED = prev

    return m, step


def _inputs(s: Shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(s.tokens, s.d_model, generator=gen).to(s.device, s.torch_dtype).requires_grad_(True)
    g = torch.randn(s.tokens, s.d_model, generator=gen).to(s.device, s.torch_dtype)
    return x, g


# ----------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("VmHWM not found in /proc/self/status")


def measure_memory_child(impl: str, s: Shape, threads: int) -> None:
    """Runs in a subprocess: one warm-up step, then the memory of one more step, two ways.

    ``peak_mb``: the peak of live tensor bytes during the step above the level before it, from the
    allocation events torch.profiler records for every tensor (the same accounting for every
    implementation, whatever their allocation patterns). ``peak_rss_mb``: the peak resident set during
    the step minus the resident set before it (includes allocator effects, so it is noisier)."""
    torch.set_num_threads(threads)
    _, step = build(impl, s)
    x, g = _inputs(s, 1)
    step(x, g)
    x.grad = None
    import gc

    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(x, g)
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    x.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current one
    before = _rss_mb()
    step(x, g)
    print(json.dumps({"peak_mb": peak / 2**20, "peak_rss_mb": _hwm_mb() - before}))


def peak_memory(impl: str, s: Shape, threads: int) -> dict[str, float | None]:
    if s.device.startswith("cuda"):
        return {"peak_mb": _peak_memory_cuda(impl, s), "peak_rss_mb": None}
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, __file__, "--_memory", impl, json.dumps(s.__dict__), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        print(f"  memory run of {impl} failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
        return {"peak_mb": None, "peak_rss_mb": None}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _peak_memory_cuda(impl: str, s: Shape) -> float:
    """On a GPU the caching allocator reports the peak itself: peak allocated during one step minus
    what was allocated before it."""
    _, step = build(impl, s)
    x, g = _inputs(s, 1)
    step(x, g)
    x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step(x, g)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def profile_breakdown(s: Shape, impl: str = "moeparadigms", steps: int = 3) -> list[dict]:
    """Where one forward+backward of ``impl`` spends its time: the layer's own ranges (moe/router,
    moe/permute, moe/experts, moe/unpermute), the autograd nodes of the backward and the top ATen ops,
    per step, from torch.profiler (which adds some overhead of its own: read shares, not absolutes)."""
    _, step = build(impl, s)
    x, g = _inputs(s, 1)
    step(x, g)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            x.grad = None
            step(x, g)
    rows = []
    for e in prof.key_averages():
        if e.key.startswith("moe/") or "Backward" in e.key or e.key.startswith("aten::"):
            rows.append({"name": e.key, "total_ms": e.cpu_time_total / steps / 1000, "self_ms": e.self_cpu_time_total / steps / 1000,
                         "calls": e.count // steps})
    rows.sort(key=lambda r: -r["self_ms"])
    ranges = sorted((r for r in rows if r["name"].startswith("moe/") or r["name"].endswith("Backward")
                     and not r["name"].startswith("autograd::")), key=lambda r: -r["total_ms"])
    return ranges + [r for r in rows if r["name"].startswith("aten::")][:12]


SKIPPED: dict[str, str] = {}  # impl -> why it did not run (written into the JSON's meta)


def time_config(s: Shape, impls: list[str], warmup: int, reps: int, threads: int) -> dict[str, list[float]]:
    built, skipped = {}, SKIPPED
    for impl in impls:
        try:
            built[impl] = build(impl, s)[1]
        except Unavailable as e:
            skipped[impl] = str(e)
            print(f"  skip {impl}: {e}", file=sys.stderr)
    x, g = _inputs(s, 1)
    for impl in list(built):  # one trial step each: an implementation that cannot run this shape/dtype is skipped, not fatal
        try:
            built[impl](x, g)
        except Exception as e:  # noqa: BLE001
            if impl in ("dense", "dense-glu") or impl.startswith("moeparadigms"):
                raise  # our layer and its dense reference must run
            skipped[impl] = f"{type(e).__name__}: {e}"
            print(f"  skip {impl}: it failed its trial step ({skipped[impl]})", file=sys.stderr)
            del built[impl]
        x.grad = None
    times: dict[str, list[float]] = {i: [] for i in built}
    names = list(built)
    for r in range(warmup + reps):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first
        for impl in order:
            x.grad = None
            t0 = time.perf_counter()
            built[impl](x, g)
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[impl].append(dt)
    return times


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the JSON records here")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, 1 warm-up + 2 reps, no memory subprocesses: a seconds-long smoke run")
    ap.add_argument("--demo", action="store_true", help="the README demo: E in {8, 64}, k = 2, 4096 tokens, 3 reps")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--top-k", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--impls", nargs="+", default=MLP_IMPLS + GLU_IMPLS)
    ap.add_argument("--no-memory", action="store_true", help="skip the per-implementation memory subprocesses")
    ap.add_argument("--profile", action="store_true", help="also profile our dropless layer per configuration")
    ap.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--markdown", metavar="JSON", help="print the Markdown tables of an earlier run's JSON and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        with open(args.markdown) as f:
            print(markdown_tables(json.load(f)["records"]))
        return []
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device} asked for, but torch.cuda.is_available() is False")
    if args._memory:
        measure_memory_child(args._memory[0], Shape(**json.loads(args._memory[1])), args.threads)
        return []
    if args.quick:
        args.tokens, args.d_model, args.hidden, args.experts, args.top_k = 256, 64, 128, [4], [1, 2]
        args.warmup, args.reps = 1, 2
        # the memory measurement starts a fresh interpreter per implementation and configuration (torch's import,
        # seconds each): minutes in all, so the smoke run times only
        args.no_memory = True
    elif args.demo:
        args.tokens, args.experts, args.top_k, args.warmup, args.reps = 4096, [8, 64], [2], 1, 3
    for name in ("tokens", "d_model", "hidden", "warmup", "reps", "threads"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            ap.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.tokens % min(SEQ_LEN, args.tokens):
        ap.error(f"--tokens must be a multiple of {SEQ_LEN} (peers take sequences of {SEQ_LEN}), got {args.tokens}")
    unknown = set(args.impls) - set(MLP_IMPLS + GLU_IMPLS)
    if unknown:
        ap.error(f"unknown --impls {sorted(unknown)}; choose from {MLP_IMPLS + GLU_IMPLS}")
    torch.set_num_threads(args.threads)
    # every family that is asked for runs with its dense reference, which goes first
    impls = []
    for family in (MLP_IMPLS, GLU_IMPLS):
        chosen = [i for i in family if i in args.impls]
        if chosen and family[0] not in chosen:
            chosen.insert(0, family[0])
        impls += chosen

    records: list[dict] = []
    profiles: list[dict] = []
    for E in args.experts:
        for k in args.top_k:
            s = Shape(args.tokens, args.d_model, args.hidden, E, k, args.device, args.dtype)
            print(f"E={E} k={k}: timing {len(impls)} implementations interleaved ({args.warmup}+{args.reps} rounds)...", flush=True)
            times = time_config(s, impls, args.warmup, args.reps, args.threads)
            med = {i: statistics.median(t) for i, t in times.items()}
            for impl in times:
                mem = {"peak_mb": None, "peak_rss_mb": None} if args.no_memory else peak_memory(impl, s, args.threads)
                dense = DENSE_OF[impl]
                records.append({
                    "E": E, "k": k, "impl": impl, "median_s": med[impl],
                    "ratio_vs_dense": med[impl] / med[dense] if dense in med else None,
                    "peak_mb": mem["peak_mb"], "peak_rss_mb": mem["peak_rss_mb"],
                    "family": "glu" if dense == "dense-glu" else "mlp", "dense_impl": dense,
                    "tokens": s.tokens, "d_model": s.d_model, "hidden": s.hidden, "dtype": s.dtype, "device": s.device,
                    "threads": args.threads, "reps": args.reps, "times_s": times[impl],
                    "peak_mb_ratio_vs_dense": None,
                })
            by_impl = {r["impl"]: r for r in records if r["E"] == E and r["k"] == k}
            for r in by_impl.values():
                d = by_impl.get(r["dense_impl"])
                if d and r["peak_mb"] is not None and d["peak_mb"]:
                    r["peak_mb_ratio_vs_dense"] = r["peak_mb"] / d["peak_mb"]
            print_table([r for r in records if r["E"] == E and r["k"] == k])
            if args.profile:
                prof = profile_breakdown(s)
                profiles.append({"E": E, "k": k, "impl": "moeparadigms", "rows": prof})
                print(f"profile of moeparadigms, E={E} k={k} (ms per step; total includes children):")
                for r in prof:
                    print(f"  {r['name']:48s} total {r['total_ms']:8.1f}  self {r['self_ms']:8.1f}  calls {r['calls']}")
                print(flush=True)
    meta = {"torch": torch.__version__, "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor(), "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "argv": sys.argv[1:] if argv is None else argv, "skipped": SKIPPED}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "records": records, "profiles": profiles}, f, indent=1)
        print(f"wrote {len(records)} records to {args.out}")
    return records


def markdown_tables(records: list[dict]) -> str:
    """One Markdown table per family: median time, ratio to its dense equivalent, peak memory."""
    out = []
    for family, title in (("mlp", "MLP (GELU) experts, vs dense FFN of hidden k*h"), ("glu", "SwiGLU experts, vs dense SwiGLU FFN of hidden k*h")):
        rows = [r for r in records if r["family"] == family]
        if not rows:
            continue
        configs = sorted({(r["E"], r["k"]) for r in rows})
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        out.append(f"**{title}** (median ms over the reps / ratio to dense / peak MB)\n")
        out.append("| impl | " + " | ".join(f"E={E} k={k}" for E, k in configs) + " |")
        out.append("|---|" + "---|" * len(configs))
        for impl in impls:
            cells = []
            for E, k in configs:
                r = next((r for r in rows if r["impl"] == impl and r["E"] == E and r["k"] == k), None)
                if r is None:
                    cells.append("-")
                    continue
                mem = f"{r['peak_mb']:.0f} MB" if r.get("peak_mb") is not None else "-"
                cells.append(f"{1000 * r['median_s']:.0f} ms / **{r['ratio_vs_dense']:.2f}x** / {mem}")
            out.append(f"| {impl} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def print_table(rows: list[dict]) -> None:
    print(f"{'impl':34s} {'median ms':>10s} {'x dense':>8s} {'peak MB':>9s} {'mem x dense':>11s}")
    for r in rows:
        ratio = f"{r['ratio_vs_dense']:.2f}" if r["ratio_vs_dense"] is not None else "-"
        mem = f"{r['peak_mb']:.0f}" if r["peak_mb"] is not None else "-"
        mr = f"{r['peak_mb_ratio_vs_dense']:.2f}" if r["peak_mb_ratio_vs_dense"] is not None else "-"
        print(f"{r['impl']:34s} {1000 * r['median_s']:10.1f} {ratio:>8s} {mem:>9s} {mr:>11s}")
    print(flush=True)


if __name__ == "__main__":
    main()
