"""BitNeRF's passes around the integer product, fused in C++ for the CPU.

Around each ternary matmul a BitNet layer normalises, quantizes and rescales its activations. As torch ops that
is a dozen passes over an [M, K] tensor, each memory-bound; at width 128 they cost more than the int8 matmul
itself. Here each is one pass that handles a row while it sits in the L1 cache:

- `quantize_rows`: the RMSNorm (r = 1 / sqrt(mean(x^2) + eps), y = (x * r) * g; optional), then per-row absmax
  int8 quantization q = round(y / s), s = max|y| / 127 (torchao's quantize_int8_rowwise, eps 1e-5), and the
  dequantized q * s that the weight gradient needs;
- `scale_bias`: float(acc) * s * w + b for the int32 product, and the ReLU that follows;
- `rms_norm_backward`: the RMSNorm's input gradient and its gain's gradient in one pass;
- `relu_backward`: the gradient through the ReLU and the bias's gradient in one pass.

Quantization and scaling perform the torch ops' float32 operations in their order (no FMA contraction, round
half to even): the same bits. The RMS is summed in the kernel's own order (vector lanes, then pairwise), so r
may differ from torch's in its last bit, and now and then an activation on a rounding boundary quantizes one
step off; training and the packed model use the same kernel, so a packed model still computes exactly what its
trained forward computed (tests/test_cpu_kernels.py).

They are built on first use with torch's C++ extension tools (needs a C++ compiler, as torch.compile on a CPU
does) for this CPU's instruction set and cached under torch's extensions folder. Where the build fails, or with
NERF_CPU_KERNELS=off, BitNeRF uses the torch ops (ternary_kernels.py, their one caller, chooses). Under
torch.compile they are opaque operators (registered with their output shapes), as the integer product is.
"""

from __future__ import annotations

import functools
import hashlib
import os

import torch

from utils import UserError

_SOURCE = r"""
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

// rows per task: a task's rows are handled one at a time, each while it sits in L1
constexpr int64_t GRAIN = 64;
constexpr int64_t LANES = 16;  // partial sums of a row reduction: one AVX-512 register's worth

// column sums over rows: each thread adds into its own row of `partial` [threads, K]; these are added up in
// thread order, so the result does not depend on scheduling
at::Tensor sum_partials(const at::Tensor& partial) {
  const int64_t threads = partial.size(0), K = partial.size(1);
  auto total = at::empty({K}, partial.options());
  const float* pp = partial.data_ptr<float>();
  float* out = total.data_ptr<float>();
  for (int64_t k = 0; k < K; ++k) {
    float sum = 0.0f;
    for (int64_t t = 0; t < threads; ++t) sum += pp[t * K + k];
    out[k] = sum;
  }
  return total;
}

float pairwise_sum(float* part) {
  for (int64_t width = LANES / 2; width > 0; width /= 2)
    for (int64_t j = 0; j < width; ++j) part[j] += part[j + width];
  return part[0];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_rows(
    const at::Tensor& x, const at::Tensor& extra, const at::Tensor& g, double eps, bool want_deq) {
  const int64_t M = x.size(0), Kx = x.size(1), Ke = extra.numel() ? extra.size(1) : 0, K = Kx + Ke;
  const bool norm = g.numel() > 0;
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto row_scale = at::empty({M, 1}, x.options());
  auto deq = at::empty({want_deq ? M : 0, K}, x.options());
  auto r = at::empty({norm ? M : 0, 1}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* ep = Ke ? extra.data_ptr<float>() : nullptr;
  const float* gp = norm ? g.data_ptr<float>() : nullptr;
  const float epsf = static_cast<float>(eps);
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = row_scale.data_ptr<float>();
  float* dp = want_deq ? deq.data_ptr<float>() : nullptr;
  float* rp = norm ? r.data_ptr<float>() : nullptr;
  at::parallel_for(0, M, GRAIN, [=](int64_t begin, int64_t end) {
    std::vector<float> row(K);
    float* __restrict__ y = row.data();
    for (int64_t m = begin; m < end; ++m) {
      const float* __restrict__ xr = xp + m * Kx;
      for (int64_t k = 0; k < Kx; ++k) y[k] = xr[k];
      for (int64_t k = 0; k < Ke; ++k) y[Kx + k] = ep[m * Ke + k];
      if (norm) {  // RMSNorm: r = 1 / sqrt(mean(y^2) + eps), y = (y * r) * g
        float part[LANES] = {};
        int64_t k = 0;
        for (; k + LANES <= K; k += LANES)
          for (int64_t j = 0; j < LANES; ++j) part[j] += y[k + j] * y[k + j];
        for (; k < K; ++k) part[0] += y[k] * y[k];
        const float rm = 1.0f / std::sqrt(pairwise_sum(part) / static_cast<float>(K) + epsf);
        for (k = 0; k < K; ++k) y[k] = (y[k] * rm) * gp[k];
        rp[m] = rm;
      }
      // max |y| (torch: max(amax, -amin)) as the largest bit pattern of |y|: an integer reduction, which the
      // compiler vectorizes (a float max reduction it may not reorder); a NaN stays a NaN
      uint32_t top = 0;
      for (int64_t k = 0; k < K; ++k) {
        uint32_t bits;
        std::memcpy(&bits, &y[k], sizeof bits);
        bits &= 0x7fffffffu;
        top = top > bits ? top : bits;
      }
      float amax;
      std::memcpy(&amax, &top, sizeof amax);
      const float s = amax / 127.0f;
      const float inv = 1.0f / std::max(s, 1e-5f);
      // an int8 store may alias anything (the captured K too): restrict, and the bound in a local
      int8_t* __restrict__ qr = qp + m * K;
      const int64_t n = K;
      for (int64_t k = 0; k < n; ++k) {
        const float v = std::nearbyint(y[k] * inv);
        qr[k] = static_cast<int8_t>(v);
        y[k] = v;
      }
      if (dp) {
        float* __restrict__ dr = dp + m * K;
        for (int64_t k = 0; k < K; ++k) dr[k] = y[k] * s;
      }
      sp[m] = s;
    }
  });
  return {q, row_scale, deq, r};
}

template <typename T>
at::Tensor scale_bias_of(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor& scale,
                         const at::Tensor& bias, bool relu);

at::Tensor scale_bias(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor& scale,
                      const at::Tensor& bias, bool relu) {
  if (acc.scalar_type() == at::kFloat) return scale_bias_of<float>(acc, row_scale, scale, bias, relu);
  return scale_bias_of<int32_t>(acc, row_scale, scale, bias, relu);
}

// acc: int32 from _int_mm, or float32 holding the same integers (the float product)
template <typename T>
at::Tensor scale_bias_of(const at::Tensor& acc, const at::Tensor& row_scale, const at::Tensor& scale,
                         const at::Tensor& bias, bool relu) {
  const int64_t M = acc.size(0), N = acc.size(1);
  auto out = at::empty({M, N}, row_scale.options());
  const T* ap = acc.data_ptr<T>();
  const float* sp = row_scale.data_ptr<float>();
  const float w = scale.item<float>();
  const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  at::parallel_for(0, M, GRAIN, [=](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float s = sp[m];
      const T* __restrict__ ar = ap + m * N;
      float* __restrict__ orow = op + m * N;
      if (bp) for (int64_t n = 0; n < N; ++n) orow[n] = (static_cast<float>(ar[n]) * s) * w + bp[n];
      else for (int64_t n = 0; n < N; ++n) orow[n] = (static_cast<float>(ar[n]) * s) * w;
      if (relu) for (int64_t n = 0; n < N; ++n) orow[n] = orow[n] < 0.0f ? 0.0f : orow[n];
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& extra, const at::Tensor& r,
    const at::Tensor& g) {
  const int64_t M = x.size(0), Kx = x.size(1), Ke = extra.numel() ? extra.size(1) : 0, K = Kx + Ke;
  auto grad_x = at::empty({M, Kx}, x.options());
  const int64_t threads = at::get_num_threads();
  auto partial = at::zeros({threads, K}, x.options());
  const float* gyp = grad_y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* ep = Ke ? extra.data_ptr<float>() : nullptr;
  const float* rp = r.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* gxp = grad_x.data_ptr<float>();
  float* ggp = partial.data_ptr<float>();
  at::parallel_for(0, M, GRAIN, [=](int64_t begin, int64_t end) {
    float* __restrict__ acc = ggp + at::get_thread_num() * K;
    for (int64_t m = begin; m < end; ++m) {
      const float* __restrict__ gy = gyp + m * K;
      const float* __restrict__ xr = xp + m * Kx;
      const float* __restrict__ er = ep ? ep + m * Ke : nullptr;
      const float rm = rp[m];
      // dot = sum_k grad_y g x (the gain-weighted product) in LANES partial sums, which the compiler vectorizes
      // (a single float sum it may not reorder)
      float part[LANES] = {};
      int64_t k = 0;
      for (; k + LANES <= Kx; k += LANES)
        for (int64_t j = 0; j < LANES; ++j) {
          const float p = gy[k + j] * xr[k + j];
          part[j] += p * gp[k + j];
          acc[k + j] += p * rm;
        }
      for (; k < Kx; ++k) { const float p = gy[k] * xr[k]; part[0] += p * gp[k]; acc[k] += p * rm; }
      for (k = 0; k < Ke; ++k) {
        const float p = gy[Kx + k] * er[k]; part[k % LANES] += p * gp[Kx + k]; acc[Kx + k] += p * rm;
      }
      const float dot = pairwise_sum(part);
      const float c = rm * rm * (dot * rm / static_cast<float>(K));
      float* __restrict__ gx = gxp + m * Kx;
      for (int64_t k = 0; k < Kx; ++k) gx[k] = (gy[k] * gp[k]) * rm - xr[k] * c;
    }
  });
  return {grad_x, sum_partials(partial)};
}

std::tuple<at::Tensor, at::Tensor> relu_backward(const at::Tensor& grad_h, const at::Tensor& h) {
  const int64_t M = h.size(0), N = h.size(1);
  auto grad_z = at::empty({M, N}, h.options());
  const int64_t threads = at::get_num_threads();
  auto partial = at::zeros({threads, N}, h.options());
  const float* gp = grad_h.data_ptr<float>();
  const float* hp = h.data_ptr<float>();
  float* zp = grad_z.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, M, GRAIN, [=](int64_t begin, int64_t end) {
    float* __restrict__ acc = pp + at::get_thread_num() * N;
    for (int64_t m = begin; m < end; ++m) {
      const float* __restrict__ g = gp + m * N;
      const float* __restrict__ hr = hp + m * N;
      float* __restrict__ z = zp + m * N;
      for (int64_t n = 0; n < N; ++n) {
        z[n] = hr[n] > 0.0f ? g[n] : 0.0f;
        acc[n] += z[n];
      }
    }
  });
  return {grad_z, sum_partials(partial)};
}

TORCH_LIBRARY(nerf_cpu, m) {
  m.def("quantize_rows(Tensor x, Tensor extra, Tensor g, float eps, bool want_deq)"
        " -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("scale_bias(Tensor acc, Tensor row_scale, Tensor scale, Tensor bias, bool relu) -> Tensor");
  m.def("rms_norm_backward(Tensor grad_y, Tensor x, Tensor extra, Tensor r, Tensor g) -> (Tensor, Tensor)");
  m.def("relu_backward(Tensor grad_h, Tensor h) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(nerf_cpu, CPU, m) {
  m.impl("quantize_rows", &quantize_rows);
  m.impl("scale_bias", &scale_bias);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("relu_backward", &relu_backward);
}
"""

# the compiler may not contract a * b + c into one rounding, nor assume finite numbers: the forward kernels
# must round exactly as the torch ops they replace
_CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]


@functools.lru_cache(maxsize=1)
def decide() -> tuple[bool, str]:
    """(use the fused C++ passes, why): built once per process (cached on disk across processes)."""
    mode = os.environ.get("NERF_CPU_KERNELS", "auto")
    if mode not in ("auto", "on", "off"):
        raise UserError(f"NERF_CPU_KERNELS={mode!r} is not auto, on or off")
    if mode == "off":
        return False, "torch ops (NERF_CPU_KERNELS=off)"
    try:
        _build()
    except Exception as error:  # no compiler, no ninja, a failed build: the torch ops give the same results
        if mode == "on":
            raise UserError(f"NERF_CPU_KERNELS=on but the C++ passes did not build: {str(error).splitlines()[0]}")
        return False, f"torch ops (the C++ passes did not build: {str(error).splitlines()[0][:120]})"
    return True, "fused C++ passes"


def _build() -> None:
    from torch.utils.cpp_extension import load_inline

    from hardware import cpu_flags

    # built with -march=native: a cache shared by machines with other instruction sets must not reuse it
    key = hashlib.sha256((_SOURCE + " ".join(_CFLAGS) + " ".join(sorted(cpu_flags()))).encode()).hexdigest()[:12]
    load_inline(f"nerf_cpu_kernels_{key}", cpp_sources=_SOURCE, extra_cflags=_CFLAGS, is_python_module=False,
                verbose=False)
    _register_fakes()


@functools.lru_cache(maxsize=1)
def _register_fakes() -> None:
    """Output shapes for torch.compile, which then calls the kernels as opaque operators (no graph break)."""
    def quantize_rows_fake(x, extra, g, eps, want_deq):
        m, k = x.shape[0], x.shape[1] + (extra.shape[1] if extra.dim() == 2 else 0)
        return (x.new_empty(m, k, dtype=torch.int8), x.new_empty(m, 1), x.new_empty(m if want_deq else 0, k),
                x.new_empty(m if g.shape[0] else 0, 1))

    def scale_bias_fake(acc, row_scale, scale, bias, relu):
        return row_scale.new_empty(acc.shape)

    def rms_norm_backward_fake(grad_y, x, extra, r, g):
        return x.new_empty(x.shape), x.new_empty(g.shape)

    def relu_backward_fake(grad_h, h):
        return h.new_empty(h.shape), h.new_empty(h.shape[1])

    for name, fake in (("quantize_rows", quantize_rows_fake), ("scale_bias", scale_bias_fake),
                       ("rms_norm_backward", rms_norm_backward_fake), ("relu_backward", relu_backward_fake)):
        torch.library.register_fake(f"nerf_cpu::{name}", fake)


_ENABLED: dict[str, bool] = {}  # "cpu" -> decide()'s choice, looked up as a constant under torch.compile


def enabled() -> bool:
    """decide()'s choice, made once per process, eagerly (ternary_kernels.decide_now asks first)."""
    choice = _ENABLED.get("cpu")
    if choice is None:
        if torch.compiler.is_compiling():  # no build inside a graph: the torch ops, same bits
            return False
        choice = _ENABLED["cpu"] = decide()[0]
    return choice


def active(x: torch.Tensor) -> bool:
    """Whether the fused passes serve this float32 CPU tensor."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and enabled()


_EMPTY = torch.empty(0)


def quantize_rows(x: torch.Tensor, extra: torch.Tensor | None, g: torch.Tensor | None, eps: float,
                  want_deq: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows cat(x [M, Kx], extra [M, Ke]) (never concatenated), RMSNorm'd with gain g [K] (None: as they
    are) and quantized per row: (int8 q [M, K], row scale [M, 1], q * row scale [M, K] float32 or an empty
    tensor, the RMSNorm's r [M, 1] or an empty tensor)."""
    return torch.ops.nerf_cpu.quantize_rows(x.contiguous(), _EMPTY if extra is None else extra.float().contiguous(),
                                            _EMPTY if g is None else g.float().contiguous(), eps, want_deq)


def scale_bias(acc: torch.Tensor, row_scale: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
               relu: bool = False) -> torch.Tensor:
    """acc [M, N] int32 (or float32 holding integers), row_scale [M, 1], scale [] -> (acc * row_scale) * scale +
    bias [N], float32 [M, N]; then the ReLU if `relu`."""
    return torch.ops.nerf_cpu.scale_bias(acc.contiguous(), row_scale.contiguous(), scale.float(),
                                         _EMPTY if bias is None else bias.float().contiguous(), relu)


def rms_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, extra: torch.Tensor | None, r: torch.Tensor,
                      g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of y = cat(x, extra) * r * g, r = rsqrt(mean(cat^2) + eps) for grad_y [M, K]: (grad x [M, Kx],
    grad g [K])."""
    return torch.ops.nerf_cpu.rms_norm_backward(
        grad_y.contiguous(), x.float().contiguous(), _EMPTY if extra is None else extra.float().contiguous(),
        r.contiguous(), g.float().contiguous())


def relu_backward(grad_h: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Through h = relu(z) [M, N]: (grad z = grad_h where h > 0, else 0; its column sums [N], the bias's
    gradient) in one pass."""
    return torch.ops.nerf_cpu.relu_backward(grad_h.contiguous(), h.contiguous())
