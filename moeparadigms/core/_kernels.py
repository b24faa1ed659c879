"""CPU kernels for the experts: a grouped GEMM (many independent ``C_g = A_g @ B_g`` products run in parallel over
groups) and the whole expert feed-forward, forward and backward, one expert per task (``ffn_forward``,
``ffn_backward``, used by :class:`~moeparadigms.core.grouped_ffn.GroupedFFN`).

Why: a Python loop of ``torch.mm`` over experts parallelises *inside* each small GEMM, paying a thread
fork/join per expert and collapsing when another process shares the cores; ``torch.bmm`` parallelises
*over* the batch (each GEMM single-threaded) and stays fast, but needs equal group sizes. This C++
function gives ragged groups the bmm treatment: groups are split into pieces of rows and the intra-op threads take pieces from a shared queue, largest first, each piece one
single-threaded ``at::mm_out`` into its output slice.

It is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (about a minute, one line on
stderr while it compiles, cached under ``TORCH_EXTENSIONS_DIR``). If compilation is impossible (no compiler)
the experts fall back to the Python loop, with a warning; set ``MOEPARADIGMS_NO_EXTENSION=1`` to skip it on purpose.
"""
from __future__ import annotations

import os
import sys
import threading
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <numeric>
#include <optional>
#include <vector>

struct Piece { int64_t g; int64_t lo; int64_t hi; double cost; };

// c_g = bias_g + a_g @ b_g for every group g (bias: empty list for none, else one (N,) tensor per group).
// Big groups are split into pieces along the rows of a_g and c_g (for a weight gradient a_g = x_g^T is a
// transposed view, and its rows are x_g's columns: still independent), so a few large groups fill all threads.
void grouped_mm_out(std::vector<at::Tensor> a, std::vector<at::Tensor> b, std::vector<at::Tensor> c,
                    std::vector<at::Tensor> bias, bool inference) {
  const int64_t G = static_cast<int64_t>(a.size());
  const bool has_bias = !bias.empty();
  TORCH_CHECK(static_cast<int64_t>(b.size()) == G && static_cast<int64_t>(c.size()) == G,
              "grouped_mm_out: a, b and c must have the same number of groups");
  TORCH_CHECK(!has_bias || static_cast<int64_t>(bias.size()) == G, "grouped_mm_out: one bias per group");
  if (G == 0) return;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  double total = 0;
  std::vector<double> cost(G);
  for (int64_t g = 0; g < G; ++g) {
    cost[g] = static_cast<double>(a[g].size(0)) * a[g].size(1) * b[g].size(1);
    total += cost[g];
  }
  const double target = std::max(total / (8.0 * nt), 1.0);
  std::vector<Piece> pieces;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t len = a[g].size(0);
    if (len == 0 || cost[g] == 0) continue;
    // at least 16 rows a piece: thinner GEMMs waste more than the balance gains
    int64_t n = std::min<int64_t>(std::max<int64_t>(1, len / 16), std::max<int64_t>(1, static_cast<int64_t>(cost[g] / target)));
    for (int64_t i = 0; i < n; ++i) {
      int64_t lo = len * i / n, hi = len * (i + 1) / n;
      pieces.push_back({g, lo, hi, cost[g] * (hi - lo) / len});
    }
  }
  // largest first, then a shared counter: a thread slowed down by another process on its core simply
  // takes fewer pieces
  std::sort(pieces.begin(), pieces.end(), [](const Piece& x, const Piece& y) { return x.cost > y.cost; });
  std::atomic<int64_t> next{0};
  const int64_t P = static_cast<int64_t>(pieces.size());
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads start with it on
    // so is inference mode: without it a worker may not write into the caller's inference tensors
    std::optional<c10::InferenceMode> im;
    if (inference) im.emplace();
    for (int64_t i = next.fetch_add(1); i < P; i = next.fetch_add(1)) {
      const Piece& p = pieces[i];
      auto out = c[p.g].narrow(0, p.lo, p.hi - p.lo);
      auto x = a[p.g].narrow(0, p.lo, p.hi - p.lo);
      if (has_bias) at::addmm_out(out, bias[p.g], x, b[p.g]); else at::mm_out(out, x, b[p.g]);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// The whole expert feed-forward, one expert per task: for expert e's rows s..t,
//   forward   h = x_e W1 + b1 (saved when asked), a = act(h), y = a W2 + b2
//   backward  dW2 = act(h)^T dy, db2 = sum dy, da = dy W2^T, dh = act'(da, h), dW1 = x_e^T dh,
//             db1 = sum dh, dx_e = dh W1^T
// with every per-expert intermediate (x_e gathered from the token-order input, a, da, dh) a temporary of
// that expert's rows only, used while it is in cache: no full-size gathered input, activation or
// activation gradient ever exists, and no per-expert view is built in Python.
// act: 0 gelu, 1 gelu (tanh), 2 relu, 3 silu; glu: h = [gate | up], a = act(gate) * up.

static at::Tensor act_plain(const at::Tensor& h, int64_t act) {
  switch (act) {
    case 0: return at::gelu(h);
    case 1: return at::gelu(h, "tanh");
    case 2: return at::relu(h);
    default: return at::silu(h);
  }
}

static at::Tensor act_plain_bwd(const at::Tensor& g, const at::Tensor& h, int64_t act) {
  switch (act) {
    case 0: return at::gelu_backward(g, h);
    case 1: return at::gelu_backward(g, h, "tanh");
    case 2: return at::threshold_backward(g, h, 0);
    default: return at::silu_backward(g, h);
  }
}

static at::Tensor act_fwd(const at::Tensor& h, int64_t act, bool glu) {
  if (!glu) return act_plain(h, act);
  auto parts = h.chunk(2, -1);
  return act_plain(parts[0], act) * parts[1];
}

static at::Tensor act_bwd(const at::Tensor& da, const at::Tensor& h, int64_t act, bool glu) {
  if (!glu) return act_plain_bwd(da, h, act);
  auto parts = h.chunk(2, -1);
  auto dh = at::empty_like(h);
  auto d = dh.chunk(2, -1);
  at::mul_out(d[1], da, act_plain(parts[0], act));
  d[0].copy_(act_plain_bwd(da * parts[1], parts[0], act));
  return dh;
}

// Runs fn(e) for every expert with rows, largest first: across the intra-op threads (each task
// single-threaded) when there are enough tasks to keep them busy, else one after another on the
// calling thread (each op then uses every thread itself).
template <typename F>
static void for_experts(const std::vector<int64_t>& starts, const std::vector<int64_t>& ends, bool inference, F fn) {
  std::vector<int64_t> tasks;
  for (int64_t e = 0; e < static_cast<int64_t>(starts.size()); ++e)
    if (ends[e] > starts[e]) tasks.push_back(e);
  std::stable_sort(tasks.begin(), tasks.end(), [&](int64_t a, int64_t b) {
    return ends[a] - starts[a] > ends[b] - starts[b];
  });
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  const int64_t P = static_cast<int64_t>(tasks.size());
  if (nt == 1 || P < 2 * nt) {
    for (int64_t e : tasks) fn(e);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, nt, 1, [&](int64_t, int64_t) {
    at::NoGradGuard no_grad;
    std::optional<c10::InferenceMode> im;
    if (inference) im.emplace();
    for (int64_t i = next.fetch_add(1); i < P; i = next.fetch_add(1)) fn(tasks[i]);
  });
}

static at::Tensor rows_of(const at::Tensor& x, const at::Tensor& idx, int64_t s, int64_t n) {
  return idx.numel() ? x.index_select(0, idx.narrow(0, s, n)) : x.narrow(0, s, n);
}

// idx: token row of each sorted row (gathered from x), or an empty tensor (x is already sorted).
// h: (A, H1) to keep the pre-activation in, or an empty tensor (inference: nothing is kept).
void ffn_forward(at::Tensor x, at::Tensor idx, std::vector<int64_t> starts, std::vector<int64_t> ends,
                 std::vector<int64_t> blk, std::vector<int64_t> row, std::vector<at::Tensor> w1,
                 std::vector<at::Tensor> w2, std::vector<at::Tensor> b1, std::vector<at::Tensor> b2,
                 int64_t act, bool glu, at::Tensor h, at::Tensor y, bool inference) {
  const bool keep_h = h.numel() > 0, has_bias = !b1.empty();
  for_experts(starts, ends, inference, [&](int64_t e) {
    const int64_t s = starts[e], n = ends[e] - starts[e], b = blk[e], r = row[e];
    auto xe = rows_of(x, idx, s, n);
    at::Tensor he = keep_h ? h.narrow(0, s, n) : at::empty({n, w1[b].size(2)}, x.options());
    if (has_bias) at::addmm_out(he, b1[b].select(0, r), xe, w1[b].select(0, r));
    else at::mm_out(he, xe, w1[b].select(0, r));
    auto a = act_fwd(he, act, glu);
    auto ye = y.narrow(0, s, n);
    if (has_bias) at::addmm_out(ye, b2[b].select(0, r), a, w2[b].select(0, r));
    else at::mm_out(ye, a, w2[b].select(0, r));
  });
}

// g*: one gradient tensor per weight block, written for the rows of the blocks flagged in need_* (the rows
// of experts without tokens are zeroed). dxs: (A, D) for the input gradient in sorted order, or empty.
void ffn_backward(at::Tensor x, at::Tensor idx, std::vector<int64_t> starts, std::vector<int64_t> ends,
                  std::vector<int64_t> blk, std::vector<int64_t> row, std::vector<at::Tensor> w1,
                  std::vector<at::Tensor> w2, int64_t act, bool glu, at::Tensor h, at::Tensor dy, at::Tensor dxs,
                  std::vector<at::Tensor> gw1, std::vector<at::Tensor> gw2, std::vector<at::Tensor> gb1,
                  std::vector<at::Tensor> gb2, std::vector<bool> need_w1, std::vector<bool> need_w2,
                  std::vector<bool> need_b1, std::vector<bool> need_b2, bool inference) {
  const bool need_dx = dxs.numel() > 0;
  const std::vector<int64_t> dim0{0};
  auto any = [](const std::vector<bool>& v) { return std::find(v.begin(), v.end(), true) != v.end(); };
  const bool need_dh = need_dx || any(need_w1) || any(need_b1);
  for (int64_t e = 0; e < static_cast<int64_t>(starts.size()); ++e) {
    if (ends[e] > starts[e]) continue;
    const int64_t b = blk[e], r = row[e];
    if (need_w1[b]) gw1[b].select(0, r).zero_();
    if (need_w2[b]) gw2[b].select(0, r).zero_();
    if (!gb1.empty() && need_b1[b]) gb1[b].select(0, r).zero_();
    if (!gb2.empty() && need_b2[b]) gb2[b].select(0, r).zero_();
  }
  for_experts(starts, ends, inference, [&](int64_t e) {
    const int64_t s = starts[e], n = ends[e] - starts[e], b = blk[e], r = row[e];
    auto dye = dy.narrow(0, s, n);
    auto he = h.narrow(0, s, n);
    if (need_w2[b]) { auto o = gw2[b].select(0, r); at::mm_out(o, act_fwd(he, act, glu).t(), dye); }
    if (!gb2.empty() && need_b2[b]) { auto o = gb2[b].select(0, r); at::sum_out(o, dye, dim0); }
    if (!need_dh) return;
    auto da = at::mm(dye, w2[b].select(0, r).t());
    at::Tensor dh;
    if (!glu && act <= 1) dh = at::gelu_backward_out(da, da, he, act == 1 ? "tanh" : "none");
    else if (!glu && act == 2) dh = da.masked_fill_(he <= 0, 0.0);
    else dh = act_bwd(da, he, act, glu);
    if (need_w1[b]) { auto o = gw1[b].select(0, r); at::mm_out(o, rows_of(x, idx, s, n).t(), dh); }
    if (!gb1.empty() && need_b1[b]) { auto o = gb1[b].select(0, r); at::sum_out(o, dh, dim0); }
    if (need_dx) { auto o = dxs.narrow(0, s, n); at::mm_out(o, dh, w1[b].select(0, r).t()); }
  });
}
"""

_lock = threading.Lock()
_module = None
_failed = False


def _load():
    global _module, _failed
    if _module is not None or _failed:
        return _module
    with _lock:
        if _module is not None or _failed:
            return _module
        if os.environ.get("MOEPARADIGMS_NO_EXTENSION"):
            _failed = True
            return None
        try:
            import hashlib
            import logging

            # torch logs "No CUDA runtime is found" from cpp_extension on a machine without CUDA: noise here
            ext_log = logging.getLogger("torch.utils.cpp_extension")
            level = ext_log.level
            ext_log.setLevel(logging.ERROR)
            try:
                from torch.utils.cpp_extension import get_default_build_root, load_inline

                # one build folder per torch installation and version: two virtualenvs sharing ~/.cache would
                # otherwise rebuild the extension (~35 s) every time a process of the other one loads it
                # (and per source: helpers on other branches of the same checkout would otherwise rebuild it in turn)
                tag = hashlib.sha1(f"{os.path.dirname(torch.__file__)} {torch.__version__} {_SOURCE}".encode()).hexdigest()[:10]
                root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # torch's documented override
                build = os.path.join(root, f"moeparadigms_grouped_mm-{tag}")
                os.makedirs(build, exist_ok=True)
                if not any(f.endswith(".so") for f in os.listdir(build)):
                    print(f"moeparadigms: compiling the CPU grouped-GEMM extension once (about a minute) in {build}",
                          file=sys.stderr, flush=True)
                _module = load_inline(
                    name="moeparadigms_grouped_mm",
                    cpp_sources=[_SOURCE],
                    functions=["grouped_mm_out", "ffn_forward", "ffn_backward"],
                    # at::parallel_for is header code: it only forks threads when built with OpenMP. The
                    # soname libgomp.so.1 resolves to the copy torch already loaded, so MKL sees our threads
                    # as an active parallel region and runs each GEMM single-threaded.
                    extra_cflags=["-O3", "-fopenmp"],
                    extra_ldflags=["-fopenmp"],
                    build_directory=build,
                    verbose=False,
                )
            finally:
                ext_log.setLevel(level)
        except Exception as e:  # noqa: BLE001 - any build failure means: use the Python loop
            _failed = True
            warnings.warn(
                f"moeparadigms: the CPU grouped-GEMM extension could not be built ({type(e).__name__}: {e}); "
                "falling back to a Python loop of torch.mm (correct, slower on CPU)",
                RuntimeWarning,
                stacklevel=3,
            )
    return _module


def available() -> bool:
    return _load() is not None


def extension():
    """The compiled extension module (``grouped_mm_out``, ``ffn_forward``, ``ffn_backward``), or None where it
    cannot be built (or ``MOEPARADIGMS_NO_EXTENSION`` is set)."""
    return _load()


def grouped_mm_out(
    a: Sequence[Tensor], b: Sequence[Tensor], c: Sequence[Tensor], *, bias: Sequence[Tensor] | None = None
) -> None:
    """``c[g] = bias[g] + a[g] @ b[g]`` for every g, in place (a group with an empty dimension is skipped: its c is left untouched).

    Uses the parallel extension on CPU when available, else one ``torch.mm``/``torch.addmm`` per group."""
    mod = _load() if a and a[0].device.type == "cpu" else None
    if mod is not None:
        mod.grouped_mm_out(list(a), list(b), list(c), list(bias) if bias is not None else [], torch.is_inference_mode_enabled())
        return
    for g, (x, y, z) in enumerate(zip(a, b, c, strict=True)):
        if x.shape[0] and y.shape[-1] and x.shape[-1]:
            if bias is None:
                torch.mm(x, y, out=z)
            else:
                torch.addmm(bias[g], x, y, out=z)
