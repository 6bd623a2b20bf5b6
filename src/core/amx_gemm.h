// y = x W^T (+ bias) with bfloat16 weights on Intel AMX (AMX-BF16 tiles, float32 accumulation),
// for the compute-bound products of the LLM prefill and the vision encoder.
//
// Why not at::linear: libtorch 1.13 hands a bf16 product to oneDNN, which re-packs the whole
// weight matrix into its blocked layout at every call (a read and a write of every weight byte,
// as long as the product itself for the shapes here), and rounds the result to bf16. This kernel
// reads the weights where they are, in their [out, in] row-major layout (memory-mapped
// checkpoints stay untouched: no copy, no extra RSS): a weight block of 16 rows x 32 inputs is
// exactly an AMX "A" tile, so the product is computed transposed, y^T = W x^T, with x packed
// once per call into the pair-interleaved layout of the "B" tiles (small: tokens x in). The
// 16 x 16 float32 result tiles are transposed back on the way out, where bias, activation and
// the output rounding happen too (and an optional residual is added, so that x + f(x) is rounded
// once).
//
// Several weights that share the same input (q/k/v, gate/up) can be computed in one call: x is
// packed once and all their row blocks are handed out to the threads from one shared counter,
// in one parallel region.
//
// Numerics: x is rounded to bf16 (round to nearest even), products and sums are float32 (AMX
// TDPBF16PS), the output is float32 or rounded once to bf16 after bias and activation.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

#include "core/amx.h"  // has_amx_bf16

namespace voken::core {

enum class Activation { None, GeluErf, GeluTanh };

struct AmxLinearJob {
  at::Tensor weight;  // [N, K] bfloat16, unit stride along K (any row stride)
  at::Tensor bias;    // [N] any float dtype, or undefined
  Activation activation = Activation::None;
  at::Tensor residual;  // of the output's shape (float32 or bf16), added last, or undefined
};

// For every job: x [..., K] (float32 or bf16, CPU) times weight^T -> [..., N] in out_dtype
// (float32 or bf16). ArgumentError when AMX is missing or the arguments do not fit.
std::vector<at::Tensor> amx_linear_many(const at::Tensor& x, const std::vector<AmxLinearJob>& jobs,
                                        at::ScalarType out_dtype);

at::Tensor amx_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias = {},
                      at::ScalarType out_dtype = at::kFloat, Activation activation = Activation::None,
                      const at::Tensor& residual = {});

// The operands of the bf16 multi-head attention kernels (amx_attention below and the UNet's
// diffusion::fused_attention_bf16): q [B, Tq, heads * D], k and v [B, Tk, heads * D], unit stride
// in the last dimension, rows possibly strided (e.g. views of a fused qkv product).
struct AttentionOperands {
  const uint16_t *q = nullptr, *k = nullptr, *v = nullptr;  // bfloat16 bits
  int64_t batch = 0, heads = 0, head_dim = 0, queries = 0, keys = 0;
  int64_t q_batch = 0, q_row = 0, k_batch = 0, k_row = 0, v_batch = 0, v_row = 0;  // strides (elements)
};
// Checks q, k and v against that layout (3-D bfloat16 CPU tensors, equal widths divisible by
// `heads`, equal batches, k and v of equal length, at least one key) and describes them; throws
// ArgumentError naming `what` and the shapes otherwise.
AttentionOperands attention_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     int64_t heads, const std::string& what);

// Multi-head attention for bf16 activations (the vision encoder's): softmax((q * scale) k^T) v
// per head, q [B, Tq, heads * D], k and v [B, Tk, heads * D] (unit stride in the last dimension,
// rows may be strided, e.g. views of a fused qkv product). q is scaled and rounded to bf16 first
// (as `q * scale` would be), scores and softmax are float32, the probabilities are rounded to
// bf16 for the product with v, and the output is rounded once. Returns [B, Tq, heads * D] bf16.
// Each 32-query block keeps all its scores in a buffer, so the key count is bounded.
constexpr int64_t kAmxAttentionMaxHeadDim = 256;
constexpr int64_t kAmxAttentionMaxKeys = 4096;
bool amx_attention_supported(int64_t head_dim, int64_t keys);
at::Tensor amx_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                         double scale);

}  // namespace voken::core
