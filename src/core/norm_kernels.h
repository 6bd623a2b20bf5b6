// Group norm, layer norm, softmax, GEGLU and few-row bfloat16 linear kernels for float32 and bfloat16
// activations on CPU.
//
// Why not at::group_norm / at::layer_norm: in libtorch 1.13 (CPU) their bfloat16 kernels lose
// precision badly (max errors of 5-20 for a channels-last group norm over 64x64 maps, >1 for a
// layer norm of rows with an offset of 100), and the float32 channels-last group norm computes
// var = E[x^2] - E[x]^2 in float32 (1e-2 errors for offset inputs). These kernels accumulate
// shifted sums in float32 over short runs and in float64 across runs, read either memory order
// (NCHW or NHWC) without reordering, and can apply SiLU in the same pass.
//
// Every function runs at any CPU tier up to cpu_tier() (a higher one is an ArgumentError): AVX-512
// (16 lanes; the avx512_bf16 and amx tiers run it too), AVX2 (8 lanes) or generic (plain C++ that
// the compiler vectorizes; the only path on ARM64). No tier calls libtorch's bfloat16 kernels.
// exp, SiLU and GELU use the same polynomials on every tier (simd_avx512.h, simd_avx2.h and their
// scalar form here), so the tiers differ only in summation order and FMA contraction.
#pragma once

#include <ATen/core/Tensor.h>

#include "core/cpu.h"

namespace voken::core {

// x: [B, C, *spatial] float32 or bfloat16, NCHW-contiguous or channels-last (other strides are
// made contiguous first). weight, bias: [C] (any float dtype). Returns x's dtype and memory order.
at::Tensor group_norm(const at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias,
                      double eps, bool silu, CpuTier tier = cpu_tier());
// The same, writing over x (which must be NCHW-contiguous or channels-last): no new allocation,
// which matters for the VAE's 512x512 maps (each fresh buffer is mmap'd and page-faulted).
void group_norm_(at::Tensor& x, int64_t groups, const at::Tensor& weight, const at::Tensor& bias, double eps,
                 bool silu, CpuTier tier = cpu_tier());

// Over the last dimension. x: float32 or bfloat16 (made contiguous), weight, bias: [last dim] (any
// float dtype). Returns x's dtype. Shifted one-pass sums (float32 runs, float64 across runs) and
// y = x * (rstd w) + (b - mean rstd w): see layer_norm_bf16 for why the two layer norms stay two.
at::Tensor layer_norm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                      CpuTier tier = cpu_tier());

// softmax over the last dimension, in place, for a contiguous float32 or bfloat16 tensor; float32
// arithmetic. (libtorch 1.13's CPU softmax runs at about a tenth of memory speed on bfloat16
// attention scores, which made it the largest single cost of a 64x64-latent UNet step.)
void softmax_lastdim_(at::Tensor& x, CpuTier tier = cpu_tier());

// GEGLU: projected [..., 2*inner] (the value half, then the gate half; float32 or bfloat16, made
// contiguous) -> value * gelu(gate) [..., inner] in the same dtype; GELU is the exact (erf) one,
// here to ~2e-7 relative. One pass instead of libtorch's erf GELU (which alone took ~5% of a
// bfloat16 UNet step) plus a multiply.
at::Tensor geglu(const at::Tensor& projected, CpuTier tier = cpu_tier());

// y = x W^T + b: x float32 [rows, in], W bfloat16 [out, in] contiguous, b float32 [out] or
// undefined -> float32 [rows, out]. The decode GEMV (core/gemv.h) plus the bias: reads W once, at
// memory speed, float32 activations and sums; oneDNN's bfloat16 matmul repacks W on every call,
// ~10x slower at two rows. Meant for a few rows (it reads W once per 8 rows).
at::Tensor few_rows_linear_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                CpuTier tier = cpu_tier());

// LayerNorm over the last dimension of a bf16 x [..., C] (rows may be strided; unit stride in the
// last dimension, else it is made contiguous), computed in float32 as at::layer_norm(x.float(),
// ...).bfloat16() computes it: two-pass mean and variance, ((x - mean) rstd) w + b, rounded once to
// bf16. weight/bias [C] of any float dtype, or undefined.
//
// Not merged with layer_norm: the two share their dispatch and weight handling, not their
// arithmetic, and either arithmetic applied to the other would change results its parity goldens
// were accepted with. This one follows PyTorch's float32 LayerNorm on bf16 rows (two passes, the
// affine applied after normalising, one rounding, strided rows); the UNet one takes one shifted
// pass with float64 across runs and folds mean, rstd and w into one FMA per value, for float32 and
// bf16 activations alike.
at::Tensor layer_norm_bf16(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, double eps,
                           CpuTier tier = cpu_tier());

}  // namespace voken::core
