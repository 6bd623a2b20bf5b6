// The flash-attention driver of the avx512_bf16, avx512 and avx2 kernels (attention_avx512.cpp,
// attention_avx2.cpp), written once: K and V packed once per (batch, head); work units of
// Kernel::kRows queries streamed over the keys in chunks with an online softmax, three phases per
// chunk and row tile:
//   1. S = Q K^T, the chunk's K (key tiles contiguous) hot in L1 across the block's row tiles;
//   2. the softmax of those rows right away (their scores still in L1): the running maximum,
//      rescaling of the output rows when it moves, P written for phase 3;
//   3. O += P V, the chunk's V hot in L1.
// The output rows (float32, kRows x D) stay in L1/L2 for the whole block; they are divided by the
// row sums and rounded to bfloat16 once at the end.
//
// Plain C++, no target attribute and no intrinsics: the vector work is done by the Kernel's
// functions (SimdKernel in attention_simd.inc), each compiled for its instruction set and called,
// not inlined, once per row tile and chunk (a call is nothing next to the work inside it).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "core/attention_internal.h"
#include "core/work_ranges.h"

namespace voken::core::attention_detail {

// What the kernel functions know of a call.
struct FlashLayout {
  const AttentionJob* job = nullptr;
  int64_t keys_padded = 0;   // keys rounded up to 16 (a multiple of every kernel's vector width)
  int64_t dims_padded = 0;   // head_dim rounded up to the vector width: the output row length
  int64_t depth = 0;         // words per query and key row: the Q K^T reduction (see Word)
  int64_t query_blocks = 0;  // ceil(queries / kRows)
  float coef = 0;            // job->exponent_coef()
  float threshold = 0;       // job->rescale_threshold()
};

// A Kernel (SimdKernel<V> in attention_simd.inc, or a class derived from it) has:
//   Word: an element of Q, K, P and V as the products take them: float (float32 FMA), or uint32_t,
//     a pair of bfloat16 (vdpbf16ps; K and Q pair dimensions, P and V pair keys); kValuesPerWord
//     (1 or 2);
//   kRows (queries per work unit), kRowTile (query rows per register tile), kKeyTile (keys per
//     score tile), kChunk (keys per softmax chunk, a multiple of kKeyTile), kChunkStride (a score
//     and probability row's length in the scratch: the longest chunk), kLanes (the vector width);
//   and the functions called below, whose comments are in attention_simd.inc.
template <class Kernel>
class FlashAttention {
 public:
  using Word = typename Kernel::Word;

  explicit FlashAttention(const AttentionJob& job) {
    layout_.job = &job;
    layout_.keys_padded = round_up(job.keys, 16);
    layout_.dims_padded = round_up(job.head_dim, Kernel::kLanes);
    layout_.depth = kPairs ? (job.head_dim + 1) / 2 : job.head_dim;
    layout_.query_blocks = (job.queries + kRows - 1) / kRows;
    layout_.coef = job.exponent_coef();
    layout_.threshold = job.rescale_threshold();
    k_size_ = layout_.keys_padded * layout_.depth;
    v_size_ = layout_.keys_padded / kKeysPerWord * layout_.dims_padded;
  }

  void run() {
    const AttentionJob& job = *layout_.job;
    const int64_t groups = job.batch * job.heads;
    AlignedBuffer<Word> packed_k(groups * k_size_), packed_v(groups * v_size_);
    packed_k_ = packed_k.get();
    packed_v_ = packed_v.get();
    pack_in_parallel(groups, layout_.keys_padded,
                     [this](int64_t bh, int64_t begin, int64_t end) { pack(bh, begin, end); });
    run_units(groups * layout_.query_blocks, &FlashAttention::run_worker, this);
  }

 private:
  static constexpr int64_t kKeysPerWord = Kernel::kValuesPerWord;  // in P and V
  static constexpr bool kPairs = kKeysPerWord == 2;                // bf16 pairs, or floats
  static constexpr int kRows = Kernel::kRows, kRowTile = Kernel::kRowTile;
  static constexpr int64_t kChunkStride = Kernel::kChunkStride;
  static constexpr int64_t kProbabilityStride = kChunkStride / kKeysPerWord;  // words per P row

  static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

  // A chunk of the keys left: kChunk, or all of them when at most one key tile more (a tail of 16
  // keys is not worth a chunk of its own).
  static int64_t chunk_length(int64_t remaining) {
    return remaining <= kChunkStride ? remaining : Kernel::kChunk;
  }

  void pack(int64_t bh, int64_t begin, int64_t end) const {
    const AttentionJob& job = *layout_.job;
    Word* k = packed_k_ + bh * k_size_;
    Word* v = packed_v_ + bh * v_size_;
    if constexpr (kPairs) {
      pack_keys_bf16_pairs(job, bh, Kernel::kKeyTile, layout_.depth, layout_.keys_padded, begin, end, k);
      pack_values_bf16_pairs(job, bh, begin, end, layout_.dims_padded, v);
    } else {
      pack_keys_float32(job, bh, Kernel::kKeyTile, layout_.keys_padded, begin, end, k);
      pack_values_float32(job, bh, begin, end, layout_.dims_padded, v);
    }
  }

  // A worker's scratch, set up once for all its work units.
  struct Scratch {
    AlignedBuffer<Word> q, p;      // [kRows][depth] queries; [kRows][kProbabilityStride] probabilities
    AlignedBuffer<float> s, o;     // [kRowTile][kChunkStride] scores; [kRows][dims_padded] output
    float max[kRows], sum[kRows];  // the online softmax's state of each row
    float chunk[kRowTile], shift[kRowTile];  // per row of a tile: chunk maxima, then sums; max * coef
    explicit Scratch(const FlashLayout& l)
        : q(kRows * l.depth),
          p(kRows * kProbabilityStride),
          s(kRowTile * kChunkStride),
          o(kRows * l.dims_padded) {}
  };

  static void run_worker(const void* context, WorkRanges& ranges, int64_t worker) {
    const auto& self = *static_cast<const FlashAttention*>(context);
    Scratch w(self.layout_);
    for (int64_t unit = ranges.next(worker); unit >= 0; unit = ranges.next(worker)) self.run_block(unit, w);
  }

  // One work unit: queries [q0, q0 + kRows) of one (batch, head).
  void run_block(int64_t unit, Scratch& w) const {
    const FlashLayout& l = layout_;
    const AttentionJob& job = *l.job;
    const int64_t bh = unit / l.query_blocks, q0 = unit % l.query_blocks * kRows;
    const int rows = static_cast<int>(std::min<int64_t>(kRows, job.queries - q0));
    const int tiles = (rows + kRowTile - 1) / kRowTile;
    Kernel::load_queries(l, bh, q0, rows, tiles * kRowTile, w.q.get());
    std::memset(w.o.get(), 0, sizeof(float) * tiles * kRowTile * l.dims_padded);
    std::fill(w.max, w.max + kRows, -INFINITY);
    std::fill(w.sum, w.sum + kRows, 0.0f);
    const Word* k = packed_k_ + bh * k_size_;
    const Word* v = packed_v_ + bh * v_size_;
    for (int64_t k0 = 0, len = 0; k0 < l.keys_padded; k0 += len) {
      len = chunk_length(l.keys_padded - k0);  // a multiple of 16
      const int64_t valid = std::min(len, job.keys - k0);
      for (int t = 0; t < tiles; ++t) {
        Kernel::scores(l, w.q.get() + t * kRowTile * l.depth, k + k0 * l.depth, len, w.s.get());
        softmax_tile(w, t * kRowTile, valid, len);
      }
      for (int t = 0; t < tiles; ++t)
        Kernel::outputs(l, w.p.get() + t * kRowTile * kProbabilityStride,
                        v + k0 / kKeysPerWord * l.dims_padded, len, w.o.get() + t * kRowTile * l.dims_padded);
    }
    // The division by the sums, as a multiplication by their inverses.
    for (int r = 0; r < rows; ++r) w.sum[r] = 1.0f / w.sum[r];
    Kernel::store_rows(l, bh, q0, rows, w.o.get(), /*inverse_sums=*/w.sum);
  }

  // The online softmax of the tile's rows [row0, row0 + kRowTile) over a chunk's scores (w.s, `valid`
  // real keys of `len`): raise the running maxima, rescale what the rows have summed so far, write P.
  void softmax_tile(Scratch& w, int row0, int64_t valid, int64_t len) const {
    const FlashLayout& l = layout_;
    Kernel::row_maxima(w.s.get(), valid, w.chunk);
    for (int r = 0; r < kRowTile; ++r) {
      const int i = row0 + r;
      const float factor = raise_row_max(w.max[i], w.chunk[r], l.threshold, l.coef);
      if (factor != 1.0f) {
        w.sum[i] *= factor;
        float* o = w.o.get() + i * l.dims_padded;
        for (int64_t d = 0; d < l.dims_padded; ++d) o[d] *= factor;
      }
      w.shift[r] = w.max[i] * l.coef;
    }
    Kernel::exponentiate(w.s.get(), valid, len, l.coef, w.shift, w.p.get() + row0 * kProbabilityStride,
                         w.chunk);
    for (int r = 0; r < kRowTile; ++r) w.sum[row0 + r] += w.chunk[r];
  }

  FlashLayout layout_;
  int64_t k_size_ = 0, v_size_ = 0;  // words of packed K and V per (batch, head)
  Word* packed_k_ = nullptr;         // per (batch, head): key tiles [depth][kKeyTile]
  Word* packed_v_ = nullptr;         // per (batch, head): [keys_padded / kKeysPerWord][dims_padded]
};

template <class Kernel>
void flash_attention(const AttentionJob& job) {
  FlashAttention<Kernel>(job).run();
}

}  // namespace voken::core::attention_detail
