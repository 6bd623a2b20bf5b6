// What the per-tier attention kernels (attention_amx.cpp, attention_avx512.cpp,
// attention_avx2.cpp) share with core/attention.cpp: the call's description, the packings of K
// and V, and the online softmax's rule for its running maxima. Internal header, no intrinsics.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <memory>

#include "core/attention.h"
#include "core/work_ranges.h"

namespace voken::core::attention_detail {

using bf16_bits = uint16_t;

// The running row maximum is only raised (and the output rescaled) when a chunk's scores exceed it
// by more than this after scaling (in natural-log units): exp() arguments stay below it, so
// nothing overflows and the sums stay exact to float rounding, while rescales become rare after
// the first chunks.
constexpr float kRescaleThreshold = 8.0f;

// One call: the operands, the output [B, Tq, heads * D] (contiguous) and where the scale enters.
struct AttentionJob : AttentionOperands {
  bf16_bits* out = nullptr;
  AttentionNumerics numerics = AttentionNumerics::ScaledScoresFloat32;
  float scale = 1;

  // ScaledQueryBf16 multiplies q by the scale (and rounds to bf16) before the product; the scores
  // are then used as they are.
  bool scales_query() const { return numerics == AttentionNumerics::ScaledQueryBf16; }
  float score_scale() const { return scales_query() ? 1.0f : scale; }
  // The softmax in base 2: p = 2^(s * coef - max * coef) with coef = score scale * log2(e).
  float exponent_coef() const { return score_scale() * 1.44269504088896341f; }
  // kRescaleThreshold in score units.
  float rescale_threshold() const { return kRescaleThreshold / score_scale(); }
  int64_t out_row() const { return heads * head_dim; }
  const bf16_bits* q_row_ptr(int64_t b, int64_t h, int64_t n) const {
    return q + b * q_batch + n * q_row + h * head_dim;
  }
  const bf16_bits* k_row_ptr(int64_t b, int64_t h, int64_t n) const {
    return k + b * k_batch + n * k_row + h * head_dim;
  }
  const bf16_bits* v_row_ptr(int64_t b, int64_t h, int64_t n) const {
    return v + b * v_batch + n * v_row + h * head_dim;
  }
  bf16_bits* out_row_ptr(int64_t b, int64_t h, int64_t n) const {
    return out + (b * queries + n) * out_row() + h * head_dim;
  }
};

// The online softmax's update of a row's running maximum `max` by the maximum of a chunk's scores:
// the first chunk sets it; a later one raises it only past the threshold (in score units).
// Returns the factor by which the row's sum and output so far must then be multiplied
// (2^((old - new) * coef), below 2^-11), or 1 when the maximum stays.
inline float raise_row_max(float& max, float chunk_max, float threshold, float coef) {
  if (max == -INFINITY) {
    max = chunk_max;
    return 1.0f;
  }
  if (!(chunk_max > max + threshold)) return 1.0f;
  const float factor = std::exp2((max - chunk_max) * coef);
  max = chunk_max;
  return factor;
}

// 64-byte aligned, uninitialised memory for `count` values of T (scratch and packed operands).
void* aligned_bytes(int64_t bytes);  // throws std::bad_alloc
template <typename T>
class AlignedBuffer {
 public:
  explicit AlignedBuffer(int64_t count)
      : memory_(static_cast<T*>(aligned_bytes(count * int64_t(sizeof(T))))) {}
  T* get() const { return memory_.get(); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> memory_;
};

// The packings of K and V below write keys [key_begin, key_end) of one (batch, head): multiples of
// kPackKeys, key_end at most keys_padded (a multiple of 16).
constexpr int64_t kPackKeys = 512;
// Runs pack(bh, key_begin, key_end) for every (batch, head) of `groups` and every kPackKeys keys,
// in parallel (the VAE's single head is packed by every thread).
void pack_in_parallel(int64_t groups, int64_t keys_padded,
                      const std::function<void(int64_t bh, int64_t key_begin, int64_t key_end)>& pack);

// Keys in key tiles of `tile` keys (a multiple of 16; the last tile `keys_padded` minus the
// others wide): per tile [dim_words][width] 32-bit words, tile t at t * tile * dim_words words.
// Word (w, n) holds dimensions 2w and 2w + 1 of key n as bf16 (the pair a vdpbf16ps or AMX B
// operand takes); zero beyond head_dim and keys. AVX-512 (attention_avx512.cpp).
void pack_keys_bf16_pairs(const AttentionJob& job, int64_t bh, int64_t tile, int64_t dim_words,
                          int64_t keys_padded, int64_t key_begin, int64_t key_end, uint32_t* packed);
// Values: [keys_padded / 2][dims_padded] words, word (j, d) holding dimension d of keys 2j and
// 2j + 1 as bf16; zero padded. dims_padded a multiple of 16. AVX-512.
void pack_values_bf16_pairs(const AttentionJob& job, int64_t bh, int64_t key_begin, int64_t key_end,
                            int64_t dims_padded, uint32_t* packed);
// Keys widened to float32, in key tiles as above: per tile [head_dim][width] floats. AVX2
// (attention_avx2.cpp).
void pack_keys_float32(const AttentionJob& job, int64_t bh, int64_t tile, int64_t keys_padded,
                       int64_t key_begin, int64_t key_end, float* packed);
// Values widened: [keys_padded][dims_padded] float32 (dims_padded a multiple of 8), zero padded.
// AVX2.
void pack_values_float32(const AttentionJob& job, int64_t bh, int64_t key_begin, int64_t key_end,
                         int64_t dims_padded, float* packed);

// Runs body(worker, ranges) on up to parallel_threads() workers sharing `units` work items (a
// worker's scratch is then set up once, not per item).
void run_units(int64_t units, void (*body)(const void* context, WorkRanges& ranges, int64_t worker),
               const void* context);

// The tier kernels. Each fills job.out; the caller has checked the operands and the shape.
void attention_amx(const AttentionJob& job);
void attention_avx512_bf16(const AttentionJob& job);
void attention_avx512(const AttentionJob& job);
void attention_avx2(const AttentionJob& job);

}  // namespace voken::core::attention_detail
