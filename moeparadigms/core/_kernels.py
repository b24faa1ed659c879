"""A CPU grouped GEMM: many independent ``C_g = A_g @ B_g`` products run in parallel over groups.

Why: a Python loop of ``torch.mm`` over experts parallelises *inside* each small GEMM, paying a thread
fork/join per expert and collapsing when another process shares the cores; ``torch.bmm`` parallelises
*over* the batch (each GEMM single-threaded) and stays fast, but needs equal group sizes. This C++
function gives ragged groups the bmm treatment: groups are split into pieces (rows, or columns for
weight gradients) and the pieces are balanced over the intra-op threads (longest-processing-time
first), each piece one single-threaded ``at::mm_out`` into its output slice.

It is compiled on first use with ``torch.utils.cpp_extension.load_inline`` (about a minute, cached
under ``TORCH_EXTENSIONS_DIR``). If compilation is impossible (no compiler) the experts fall back to
the Python loop, with a warning; set ``MOEPARADIGMS_NO_EXTENSION=1`` to skip it on purpose.
"""
from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <numeric>
#include <vector>

struct Piece { int64_t g; int64_t lo; int64_t hi; double cost; };

// C_g = A_g @ B_g for every group g. split_rows: pieces split A_g/C_g by rows (independent rows);
// otherwise pieces split B_g/C_g by columns (A_g^T-style products whose rows are a reduction).
// bias (optional, empty list for none): c_g = bias_g + a_g @ b_g, bias_g of shape (N,).
void grouped_mm_out(std::vector<at::Tensor> a, std::vector<at::Tensor> b, std::vector<at::Tensor> c, bool split_rows,
                    std::vector<at::Tensor> bias) {
  const int64_t G = static_cast<int64_t>(a.size());
  const bool has_bias = !bias.empty();
  TORCH_CHECK(!has_bias || static_cast<int64_t>(bias.size()) == G, "grouped_mm_out: one bias per group");
  TORCH_CHECK(static_cast<int64_t>(b.size()) == G && static_cast<int64_t>(c.size()) == G,
              "grouped_mm_out: a, b and c must have the same number of groups");
  if (G == 0) return;
  const int64_t nt = std::max<int64_t>(1, at::get_num_threads());
  double total = 0;
  std::vector<double> cost(G);
  for (int64_t g = 0; g < G; ++g) {
    cost[g] = static_cast<double>(a[g].size(0)) * a[g].size(1) * b[g].size(1);
    total += cost[g];
  }
  // split any group bigger than a fraction of a thread's share, so few large groups still fill all threads
  const double target = std::max(total / (4.0 * nt), 1.0);
  std::vector<Piece> pieces;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t len = split_rows ? a[g].size(0) : b[g].size(1);
    if (len == 0 || cost[g] == 0) continue;
    int64_t n = std::min<int64_t>(len, std::max<int64_t>(1, static_cast<int64_t>(cost[g] / target)));
    if (!split_rows) n = std::min<int64_t>(n, std::max<int64_t>(1, len / 64));  // keep column pieces >= 64 wide
    for (int64_t i = 0; i < n; ++i) {
      int64_t lo = len * i / n, hi = len * (i + 1) / n;
      pieces.push_back({g, lo, hi, cost[g] * (hi - lo) / len});
    }
  }
  std::sort(pieces.begin(), pieces.end(), [](const Piece& x, const Piece& y) { return x.cost > y.cost; });
  std::vector<std::vector<Piece>> bins(nt);
  std::vector<double> load(nt, 0.0);
  for (const auto& p : pieces) {
    int64_t j = std::min_element(load.begin(), load.end()) - load.begin();
    bins[j].push_back(p);
    load[j] += p.cost;
  }
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    at::NoGradGuard no_grad;  // grad mode is thread-local: worker threads start with it on
    for (int64_t j = begin; j < end; ++j) {
      for (const auto& p : bins[j]) {
        if (split_rows) {
          auto out = c[p.g].narrow(0, p.lo, p.hi - p.lo);
          auto x = a[p.g].narrow(0, p.lo, p.hi - p.lo);
          if (has_bias) at::addmm_out(out, bias[p.g], x, b[p.g]); else at::mm_out(out, x, b[p.g]);
        } else {
          auto out = c[p.g].narrow(1, p.lo, p.hi - p.lo);
          auto y = b[p.g].narrow(1, p.lo, p.hi - p.lo);
          if (has_bias) out.copy_(at::addmm(bias[p.g].narrow(0, p.lo, p.hi - p.lo), a[p.g], y));
          else out.copy_(at::mm(a[p.g], y));  // a column slice of a row-major output is not contiguous
        }
      }
    }
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
            from torch.utils.cpp_extension import load_inline

            _module = load_inline(
                name="moeparadigms_grouped_mm",
                cpp_sources=[_SOURCE],
                functions=["grouped_mm_out"],
                # at::parallel_for is header code: it only forks threads when built with OpenMP. The
                # soname libgomp.so.1 resolves to the copy torch already loaded, so MKL sees our threads
                # as an active parallel region and runs each GEMM single-threaded.
                extra_cflags=["-O3", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                verbose=False,
            )
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


def grouped_mm_out(
    a: Sequence[Tensor], b: Sequence[Tensor], c: Sequence[Tensor], *, split_rows: bool,
    bias: Sequence[Tensor] | None = None,
) -> None:
    """``c[g] = bias[g] + a[g] @ b[g]`` for every g, in place (groups with no rows are skipped).

    ``split_rows``: the rows of a product are independent (forward, input gradients), so big groups may
    be split by rows; otherwise (weight gradients, whose rows are a reduction) by columns. Uses the
    parallel extension on CPU when available, else one ``torch.mm``/``torch.addmm`` per group."""
    mod = _load() if a and a[0].device.type == "cpu" else None
    if mod is not None:
        mod.grouped_mm_out(list(a), list(b), list(c), split_rows, list(bias) if bias is not None else [])
        return
    for g, (x, y, z) in enumerate(zip(a, b, c, strict=True)):
        if x.shape[0] and y.shape[-1] and x.shape[-1]:
            if bias is None:
                torch.mm(x, y, out=z)
            else:
                torch.addmm(bias[g], x, y, out=z)
