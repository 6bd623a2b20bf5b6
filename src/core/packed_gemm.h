// bfloat16 matrix products with weights packed once at load: linear layers and 3x3 / 1x1
// convolutions (3x3 as an implicit GEMM over a zero-padded NHWC copy of the input: stride 1 with
// padding 1, optionally of the input's 2x nearest upsampling, or stride 2 with any padding of 0 or
// 1 per side; 1x1 as a plain product), with bias and an optional residual added before the single
// rounding to bfloat16.
//
// Why not at::linear / at::conv2d (oneDNN 2.6 through libtorch 1.13): both reorder the weights
// into oneDNN's blocked layout on every call (a 1280x2560x3x3 kernel took 40-60 ms per call just
// for that), and the convolution streams the whole kernel once per output row, so SD's 16x16 and
// 8x8 levels with 1280-2560 channels ran at 60-170 GFLOP/s, a tenth of the GEMM peak. On CPUs
// without AVX-512 oneDNN has no bfloat16 kernel at all and libtorch falls back to slow reference
// loops. Here the weights are packed in tile order when the model is built, every output block
// keeps its accumulators in registers (or AMX tiles) over a K chunk whose weight panel stays in
// L1, and each weight byte is read from memory once per call.
//
// One packed layout serves every CPU tier (core/cpu.h); the tier a weight was packed for is
// recorded and its products run at that tier:
//   amx          AMX tiles: 2 x 2 tiles of 16 rows x 16 columns per 32-deep step
//   avx512_bf16  vdpbf16ps: 12 rows x 32 columns of float32 accumulators in zmm registers, the
//                activation's k-pair broadcast as one 32-bit word
//   avx512       FMA in float32: the weight panel of a K chunk widened to float32 once per task,
//                activations in a float32 copy; 12 rows x 32 columns per micro-tile
//   avx2         the same with 8-wide FMAs, 6 rows x 16 columns per micro-tile
//
// Numerics at every tier: bfloat16 inputs, products and sums in float32, one rounding to bfloat16
// at the end (after bias and residual), as oneDNN's bfloat16 kernels do; only the summation order
// differs between tiers.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>

#include "core/cpu.h"

namespace voken::core {

// A weight W [N, K] packed as the B operand of C = A W^T: 32-column blocks, each over K in 32-deep
// steps of two 16x16 pair-interleaved ("VNNI") tiles. For a k x k convolution K = k*k*C_in,
// ordered (ky, kx, c) to match NHWC pixels.
struct PackedGemmWeight {
  at::Tensor data;           // bfloat16, N/32 * K/32 * 1024 elements
  at::Tensor bias;           // float32 [N], or undefined
  int64_t out_features = 0;  // N
  int64_t in_channels = 0;   // K per kernel tap
  int64_t kernel = 1;        // 1: linear or 1x1 convolution; 3: 3x3 convolution
  // GEGLU projection (pack_geglu_weight): the columns are value/gate pairs and the product's
  // output is value * gelu(gate), out_features / 2 wide.
  bool geglu = false;
  CpuTier tier = CpuTier::generic;  // the tier the products of this weight run at

  int64_t depth() const { return kernel * kernel * in_channels; }
  int64_t output_width() const { return geglu ? out_features / 2 : out_features; }
};

// Whether a weight of this shape can be packed and run at `tier`: avx2 or above (a tier this
// process can run), N and K per tap multiples of 32, kernel 1 or 3.
bool packed_gemm_supported(int64_t out_features, int64_t in_channels, int64_t kernel,
                           CpuTier tier = cpu_tier());

// W: [N, K] (linear) or [N, C, k, k] (convolution, any memory order), any float dtype (rounded to
// bfloat16); bias [N] or undefined. Throws ArgumentError when !packed_gemm_supported.
std::shared_ptr<const PackedGemmWeight> pack_gemm_weight(const at::Tensor& weight, const at::Tensor& bias,
                                                         CpuTier tier = cpu_tier());

// A GEGLU feed-forward's input projection W [2*inner, K] (the value rows, then the gate rows, as
// diffusers' GEGLU.proj), bias [2*inner] or undefined: packed_linear then returns
// value * gelu(gate) (exact erf GELU, from the float32 sums; no bfloat16 rounding of the
// projection in between), [..., inner]. Needs packed_gemm_supported(2*inner, K, 1) and inner a
// multiple of 16.
std::shared_ptr<const PackedGemmWeight> pack_geglu_weight(const at::Tensor& weight, const at::Tensor& bias,
                                                          CpuTier tier = cpu_tier());

// x W^T + bias (+ residual): x bfloat16 [..., K] (rows with any uniform stride), residual
// bfloat16 of the output's shape or undefined (not with a GEGLU weight). Returns a contiguous
// bfloat16 [..., N] ([..., N/2] for a GEGLU weight).
at::Tensor packed_linear(const at::Tensor& x, const PackedGemmWeight& weight,
                         const at::Tensor& residual = at::Tensor());

// accumulator += x W^T + bias, in place: accumulator bfloat16 [..., N] with contiguous rows.
void packed_linear_into(const at::Tensor& x, const PackedGemmWeight& weight, at::Tensor& accumulator);

// Stride-1 convolution with padding (kernel-1)/2 (+ residual): x bfloat16 [B, C, H, W] (any memory
// order), residual bfloat16 [B, N, H, W] or undefined. Returns bfloat16 [B, N, H, W] in x's
// memory order (channels-last unless x is NCHW-contiguous). `upsample_2x`: the convolution of
// x's 2x nearest-neighbour upsampling ([B, N, 2H, 2W]; Upsample2D), without materialising it.
at::Tensor packed_conv2d(const at::Tensor& x, const PackedGemmWeight& weight,
                         const at::Tensor& residual = at::Tensor(), bool upsample_2x = false);

// Stride-2 3x3 convolution (Downsample2D) with `pad_begin` zero rows/columns at the top and left
// and `pad_end` at the bottom and right (each 0 or 1: diffusers pads (1, 1), or (0, 1) when its
// padding is 0). x bfloat16 [B, C, H, W] (any memory order); returns bfloat16
// [B, N, (H + pad_begin + pad_end - 3) / 2 + 1, (W + ...) / 2 + 1] in x's memory order.
at::Tensor packed_conv2d_stride2(const at::Tensor& x, const PackedGemmWeight& weight, int64_t pad_begin,
                                 int64_t pad_end);

// Unpacks to W [N, K] bfloat16 (and bias): for tests.
at::Tensor unpack_gemm_weight(const PackedGemmWeight& weight);

}  // namespace voken::core
