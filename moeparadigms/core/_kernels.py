"""A CPU grouped GEMM: many independent ``C_g = A_g @ B_g`` products run in parallel over groups.

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
                tag = hashlib.sha1(f"{os.path.dirname(torch.__file__)} {torch.__version__}".encode()).hexdigest()[:10]
                root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # torch's documented override
                build = os.path.join(root, f"moeparadigms_grouped_mm-{tag}")
                os.makedirs(build, exist_ok=True)
                if not any(f.endswith(".so") for f in os.listdir(build)):
                    print(f"moeparadigms: compiling the CPU grouped-GEMM extension once (about a minute) in {build}",
                          file=sys.stderr, flush=True)
                _module = load_inline(
                    name="moeparadigms_grouped_mm",
                    cpp_sources=[_SOURCE],
                    functions=["grouped_mm_out"],
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
