// The attention entry point: operand checks, the tier dispatch, the generic (ATen) tier, and what
// the tier kernels share (packing of K and V, the work split). The kernels themselves are in
// attention_amx.cpp, and for the avx512_bf16, avx512 and avx2 tiers attention_flash.h's driver
// over attention_simd.inc, compiled per instruction set in attention_avx512.cpp and
// attention_avx2.cpp.
#include "core/attention.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <new>

#include "core/attention_internal.h"
#include "core/parallel.h"
#include "core/work_ranges.h"
#include "io/tensor_bytes.h"  // shape_string
#include "voken/error.h"

namespace voken::core {

namespace attention_detail {

void* aligned_bytes(int64_t bytes) {
  // aligned_alloc wants a multiple of the alignment.
  void* p = std::aligned_alloc(64, static_cast<size_t>((std::max<int64_t>(bytes, 1) + 63) / 64 * 64));
  if (!p) throw std::bad_alloc();
  return p;
}

void pack_in_parallel(int64_t groups, int64_t keys_padded,
                      const std::function<void(int64_t bh, int64_t key_begin, int64_t key_end)>& pack) {
  const int64_t blocks = (keys_padded + kPackKeys - 1) / kPackKeys;
  parallel_items(groups * blocks, [&](int64_t item) {
    const int64_t begin = item % blocks * kPackKeys;
    pack(item / blocks, begin, std::min(begin + kPackKeys, keys_padded));
  });
}

void run_units(int64_t units, void (*body)(const void* context, WorkRanges& ranges, int64_t worker),
               const void* context) {
  const int64_t workers = std::min<int64_t>(parallel_threads(), units);
  WorkRanges ranges(units, workers);
  if (workers > 1)
    parallel_items(workers, [&](int64_t worker) { body(context, ranges, worker); });
  else
    body(context, ranges, 0);
}

#ifndef VOKEN_HAVE_AMX
void attention_amx(const AttentionJob&) { throw ArgumentError("attention: no AMX kernel in this build"); }
#endif
#ifndef VOKEN_X86_KERNELS
void attention_avx512_bf16(const AttentionJob&) {
  throw ArgumentError("attention: no x86 kernels in this build");
}
void attention_avx512(const AttentionJob&) { throw ArgumentError("attention: no x86 kernels in this build"); }
void attention_avx2(const AttentionJob&) { throw ArgumentError("attention: no x86 kernels in this build"); }
#endif

}  // namespace attention_detail

namespace {

// The generic tier: ATen in float32 on the widened bf16 inputs, the same numerics modes, query rows
// in chunks so that at most ~4M scores exist at once.
at::Tensor attention_generic(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                             double scale, AttentionNumerics numerics) {
  const int64_t batch = q.size(0), queries = q.size(1), keys = k.size(1), width = q.size(2);
  const int64_t head_dim = width / heads;
  const auto split = [&](const at::Tensor& t, int64_t n) {
    return t.to(at::kFloat).reshape({batch, n, heads, head_dim}).permute({0, 2, 1, 3});  // [B, H, n, D]
  };
  const auto scale_f = static_cast<float>(scale);
  at::Tensor qf = split(q, queries);
  // float * float is exact in double, so the product rounds to float as the kernels' does.
  if (numerics == AttentionNumerics::ScaledQueryBf16) qf = (qf * scale_f).to(at::kBFloat16).to(at::kFloat);
  const at::Tensor kt = split(k, keys).transpose(-1, -2);
  const at::Tensor vf = split(v, keys);
  at::Tensor out = at::empty({batch, heads, queries, head_dim}, qf.options());
  const int64_t step = std::max<int64_t>(1, (int64_t{4} << 20) / std::max<int64_t>(1, batch * heads * keys));
  for (int64_t r0 = 0; r0 < queries; r0 += step) {
    const int64_t rows = std::min(step, queries - r0);
    at::Tensor scores = at::matmul(qf.narrow(2, r0, rows), kt);
    if (numerics == AttentionNumerics::ScaledScoresFloat32) scores.mul_(scale_f);
    out.narrow(2, r0, rows).copy_(at::matmul(at::softmax(scores, -1), vf));
  }
  return out.permute({0, 2, 1, 3}).reshape({batch, queries, width}).to(at::kBFloat16).contiguous();
}

}  // namespace

const char* numerics_name(AttentionNumerics numerics) {
  return numerics == AttentionNumerics::ScaledQueryBf16 ? "ScaledQueryBf16" : "ScaledScoresFloat32";
}

AttentionOperands attention_operands(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     int64_t heads, const std::string& what) {
  const auto shape = [](const at::Tensor& t) {
    return t.defined() ? std::string(c10::toString(t.scalar_type())) + " " + io::shape_string(t.sizes())
                       : std::string("undefined");
  };
  const auto fits = [](const at::Tensor& t) {
    return t.defined() && t.dim() == 3 && t.scalar_type() == at::kBFloat16 && t.device().is_cpu() &&
           (t.stride(2) == 1 || t.size(2) <= 1);
  };
  if (!fits(q) || !fits(k) || !fits(v) || heads <= 0 || q.size(2) % heads != 0 || q.size(2) == 0 ||
      k.size(2) != q.size(2) || v.size(2) != q.size(2) || k.size(0) != q.size(0) || v.size(0) != q.size(0) ||
      v.size(1) != k.size(1) || k.size(1) < 1)
    throw ArgumentError(what +
                        ": expected bfloat16 CPU tensors q [B, Tq, heads * D], k and v [B, Tk, heads * D] "
                        "(Tk >= 1, D >= 1, unit stride in the last dimension) for " +
                        std::to_string(heads) + " heads, got q " + shape(q) + ", k " + shape(k) + ", v " +
                        shape(v));
  AttentionOperands o;
  o.q = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>());
  o.k = reinterpret_cast<const uint16_t*>(k.data_ptr<at::BFloat16>());
  o.v = reinterpret_cast<const uint16_t*>(v.data_ptr<at::BFloat16>());
  o.batch = q.size(0);
  o.heads = heads;
  o.head_dim = q.size(2) / heads;
  o.queries = q.size(1);
  o.keys = k.size(1);
  o.q_batch = q.stride(0);
  o.q_row = q.stride(1);
  o.k_batch = k.stride(0);
  o.k_row = k.stride(1);
  o.v_batch = v.stride(0);
  o.v_row = v.stride(1);
  return o;
}

bool attention_supported(int64_t head_dim, int64_t keys, AttentionNumerics numerics, CpuTier tier) {
  (void)numerics;  // both modes run on every tier
  if (tier > cpu_tier() || head_dim < 1 || keys < 1) return false;
  return tier == CpuTier::generic || head_dim <= kAttentionMaxHeadDim;
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                     double scale, AttentionNumerics numerics, CpuTier tier) {
  if (tier > cpu_tier())
    throw ArgumentError(std::string("attention: tier ") + tier_name(tier) + " is above this process's tier " +
                        tier_name(cpu_tier()));
  const AttentionOperands operands = attention_operands(q, k, v, heads, "attention");
  if (!attention_supported(operands.head_dim, operands.keys, numerics, tier))
    throw ArgumentError("attention: heads of " + std::to_string(operands.head_dim) +
                        " dimensions, the kernels take 1 to " + std::to_string(kAttentionMaxHeadDim) +
                        " at tier " + tier_name(tier));
  if (!(scale > 0) || !std::isfinite(scale))
    throw ArgumentError("attention: scale must be positive and finite, got " + std::to_string(scale));
  if (tier == CpuTier::generic) return attention_generic(q, k, v, heads, scale, numerics);

  at::Tensor out = at::empty({operands.batch, operands.queries, q.size(2)},
                             q.options().memory_format(at::MemoryFormat::Contiguous));
  if (operands.batch == 0 || operands.queries == 0) return out;
  attention_detail::AttentionJob job;
  static_cast<AttentionOperands&>(job) = operands;
  job.out = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  job.numerics = numerics;
  job.scale = static_cast<float>(scale);
  // The kernel of each tier from avx2 up, in CpuTier order.
  static constexpr void (*kKernels[])(const attention_detail::AttentionJob&) = {
      attention_detail::attention_avx2, attention_detail::attention_avx512,
      attention_detail::attention_avx512_bf16, attention_detail::attention_amx};
  static_assert(static_cast<int>(CpuTier::avx2) == 1 && static_cast<int>(CpuTier::amx) == 4);
  kKernels[static_cast<int>(tier) - 1](job);
  return out;
}

}  // namespace voken::core
