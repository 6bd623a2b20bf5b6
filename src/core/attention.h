// Fused multi-head attention for bfloat16 activations: softmax(q k^T * scale) v per head, for the
// UNet, the VAE, the ViT, the Q-Former and the mapper, at every CPU tier.
//
// Why: a 64x64 latent gives 4096-token self-attention. Materialised, its scores are 168M values
// per layer at batch 2 x 5 heads; the Q K^T product (reduction depth 64) is bound by writing them,
// and softmax and the P V product read them again. The kernels stream each block of queries over
// the keys in chunks with an online softmax, so the score matrix never leaves the core and any
// number of keys works.
//
// One kernel family, three phases per query block and key chunk: S = Q K^T (float32 sums of
// bf16 products), online softmax in float32, O += P V. Per tier:
//   amx          AMX tiles; P rounded to bfloat16 (a tile operand);
//   avx512_bf16  vdpbf16ps on K packed as dimension pairs x keys and V as key pairs x dimensions;
//                P rounded to bfloat16 (a vdpbf16ps operand);
//   avx512, avx2 float32 FMA on K and V widened once; P stays float32 (no extra rounding: those
//                tiers are then closer to the exact result than the bf16 ones, well inside the
//                parity tolerances that the bf16 tiers meet);
//   generic      ATen in float32 (a reference; model code keeps its own ATen path there).
// The output is rounded to bfloat16 once.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>

#include "core/cpu.h"

namespace voken::core {

// Where the scale enters, as each model's upstream code computes it (its parity suite needs it):
enum class AttentionNumerics {
  // q * scale rounded to bfloat16 first (upstream's `q * scale` in bf16: EVA ViT, the mapper's
  // nn.MultiheadAttention), then float32 scores.
  ScaledQueryBf16,
  // Float32 scores q k^T multiplied by the scale in float32 (diffusers with upcast_attention,
  // and closer to float32 than its bf16 scores otherwise; the Q-Former's division of the scores).
  ScaledScoresFloat32,
};
const char* numerics_name(AttentionNumerics numerics);

// Largest head_dim the kernels take (the VAE's single 512-wide head).
constexpr int64_t kAttentionMaxHeadDim = 512;

// Whether `attention` runs heads of `head_dim` over `keys` keys at `tier` (false for a tier
// above cpu_tier()). The generic tier runs every shape.
bool attention_supported(int64_t head_dim, int64_t keys, AttentionNumerics numerics,
                         CpuTier tier = cpu_tier());

// softmax(q k^T * scale) v per head. q: [B, Tq, heads * D] bfloat16, k and v: [B, Tk, heads * D]
// bfloat16 (Tk >= 1), unit stride in the last dimension, other strides free (views of a fused qkv
// product need no copy; a batch stride of 0 is fine). Returns [B, Tq, heads * D] bfloat16,
// contiguous. Throws ArgumentError for other operands, an unsupported shape, or a tier above
// cpu_tier().
at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                     double scale, AttentionNumerics numerics, CpuTier tier = cpu_tier());

// The operands of the attention kernels: q [B, Tq, heads * D], k and v [B, Tk, heads * D], unit
// stride in the last dimension, rows possibly strided (e.g. views of a fused qkv product).
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

}  // namespace voken::core
