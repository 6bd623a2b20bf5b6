// y = x W^T (+ bias) with bfloat16 weights read in place: for the compute-bound products of the
// LLM prefill and the vision encoder, whose weights stay where the checkpoint mapping put them.
// (core/packed_gemm.h is the other GEMM: weights re-laid out once at load, for the UNet and VAE.)
//
// Why not at::linear: libtorch 1.13 hands a bf16 product to oneDNN, which re-packs the whole
// weight matrix into its blocked layout at every call (a read and a write of every weight byte,
// as long as the product itself for the shapes here), and rounds the result to bf16. This kernel
// reads the weights where they are, in their [out, in] row-major layout (memory-mapped
// checkpoints stay untouched: no copy, no extra RSS).
//
// AMX tier: a weight block of 16 rows x 32 inputs is exactly an AMX "A" tile, so the product is
// computed transposed, y^T = W x^T, with x packed once per call into the pair-interleaved layout
// of the "B" tiles (small: tokens x in). The 16 x 16 float32 result tiles are transposed back on
// the way out, where bias, activation and the output rounding happen too (and an optional
// residual is added, so that x + f(x) is rounded once).
//
// Vector tiers (avx512_bf16, avx512, avx2): x is copied once (bf16-rounded; widened to float32 for
// the FMA tiers) and each 32-row block of weights is transposed, one K chunk at a time, into a
// per-thread L1-sized panel in the layout of the packed GEMM (core/packed_gemm.h), whose
// micro-kernels then run every row tile of x against it. The panel is the only copy of the weights
// (32 rows x one chunk), so a checkpoint's mapped weights are read in place there too.
//
// Several weights that share the same input (q/k/v, gate/up) can be computed in one call: x is
// packed once and all their row blocks are handed out to the threads in one parallel region.
//
// Numerics: x is rounded to bf16 (round to nearest even), products and sums are float32, the
// output is float32 or rounded once to bf16 after bias, activation and residual.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/cpu.h"

namespace voken::core {

enum class Activation { None, GeluErf, GeluTanh };

struct InplaceLinearJob {
  at::Tensor weight;  // [N, K] bfloat16, unit stride along K (any row stride)
  at::Tensor bias;    // [N] any float dtype, or undefined
  Activation activation = Activation::None;
  at::Tensor residual;  // of the output's shape (float32 or bf16), added last, or undefined
};

// Whether inplace_linear runs its own kernel at `tier` (otherwise callers use ATen).
bool inplace_gemm_supported(CpuTier tier = cpu_tier());

// For every job: x [..., K] (float32 or bf16, CPU) times weight^T -> [..., N] in out_dtype
// (float32 or bf16), at `tier`. ArgumentError when the tier has no kernel here or the arguments
// do not fit.
std::vector<at::Tensor> inplace_linear_many(const at::Tensor& x, const std::vector<InplaceLinearJob>& jobs,
                                            at::ScalarType out_dtype, CpuTier tier = cpu_tier());

at::Tensor inplace_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias = {},
                          at::ScalarType out_dtype = at::kFloat, Activation activation = Activation::None,
                          const at::Tensor& residual = {}, CpuTier tier = cpu_tier());

}  // namespace voken::core
