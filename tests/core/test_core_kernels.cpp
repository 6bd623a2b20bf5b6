// The core kernels: the parallel loops (core/parallel.h), the AMX attention kernel, the norm
// kernels. (The GEMMs have their own suites: test_packed_gemm, test_inplace_gemm.)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "core/attention.h"
#include "core/norm_kernels.h"
#include "core/parallel.h"
#include "voken/error.h"

namespace voken::core {
namespace {

TEST(Parallel, EveryItemRunsOnceAndErrorsReachTheCaller) {
  for (const int64_t count : {0, 1, 2, 7, 1000}) {
    std::vector<std::atomic<int>> runs(count);
    parallel_items(count, [&](int64_t item) { runs[item].fetch_add(1); });
    for (int64_t i = 0; i < count; ++i) EXPECT_EQ(runs[i].load(), 1) << "item " << i << " of " << count;
  }
  std::vector<std::atomic<int>> covered(103);
  parallel_range(5, 103, 4, [&](int64_t begin, int64_t end) {
    EXPECT_LT(begin, end);
    for (int64_t i = begin; i < end; ++i) covered[i].fetch_add(1);
  });
  for (int64_t i = 0; i < 103; ++i) EXPECT_EQ(covered[i].load(), i >= 5 ? 1 : 0);
  EXPECT_THROW(parallel_items(64,
                              [](int64_t item) {
                                if (item == 13) throw ArgumentError("item 13");
                              }),
               ArgumentError);
}

// The reason core/parallel.h exists: at::parallel_for in code built without OpenMP runs on the
// calling thread alone. Items that each wait a little must be shared by more than one thread.
TEST(Parallel, ItemsRunOnSeveralThreads) {
  if (std::thread::hardware_concurrency() < 2) GTEST_SKIP() << "one core here";
  set_intra_op_threads(2, "threads");
  std::mutex mutex;
  std::set<std::thread::id> threads;
  parallel_items(32, [&](int64_t) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
    const std::lock_guard<std::mutex> lock(mutex);
    threads.insert(std::this_thread::get_id());
  });
  EXPECT_GE(threads.size(), 2u) << "parallel_items ran its 32 items on one thread";
  // Inside a parallel region the loop runs inline (no nested team).
  std::atomic<int> inner{0};
  parallel_items(2, [&](int64_t) { parallel_items(4, [&](int64_t) { inner.fetch_add(1); }); });
  EXPECT_EQ(inner.load(), 8);
}

// 0 means $OMP_NUM_THREADS when set (libtorch applied it), else one thread per core.
TEST(Parallel, ThreadCountOption) {
  const char* env = std::getenv("OMP_NUM_THREADS");
  const std::string saved = env ? env : "";
  ::unsetenv("OMP_NUM_THREADS");
  set_intra_op_threads(3, "threads");
  EXPECT_EQ(at::get_num_threads(), 3);
  set_intra_op_threads(0, "threads");
  EXPECT_EQ(at::get_num_threads(), static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  ::setenv("OMP_NUM_THREADS", "1", 1);
  set_intra_op_threads(3, "threads");
  set_intra_op_threads(0, "threads");
  EXPECT_EQ(at::get_num_threads(), 3) << "with OMP_NUM_THREADS set, 0 leaves libtorch's setting alone";
  if (env)
    ::setenv("OMP_NUM_THREADS", saved.c_str(), 1);
  else
    ::unsetenv("OMP_NUM_THREADS");
  try {
    set_intra_op_threads(-2, "LoadOptions::num_threads");
    ADD_FAILURE() << "a negative thread count was accepted";
  } catch (const ArgumentError& e) {
    EXPECT_NE(std::string(e.what()).find("LoadOptions::num_threads must be >= 0"), std::string::npos)
        << e.what();
  }
  set_intra_op_threads(0, "threads");
}

// The AMX attention kernel (core/attention.h) runs at the amx tier only.
class AmxAttention : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cpu_tier() != CpuTier::amx)
      GTEST_SKIP() << "this CPU/OS offers no AMX-BF16; the kernel is not used here";
  }
};

// Attention against float64 on the same bf16 inputs, with q * scale rounded to bf16 as the kernel
// (and upstream) does. The kernel's other roundings: probabilities to bf16 (relative 2^-9 each)
// and the output (2^-9), so |o - ref| <= 2^-8 (P |v|) + 2^-8 |ref| (+ float32 sums, far smaller).
void expect_attention_close(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads,
                            double scale, const std::string& what) {
  const auto got = amx_attention(q, k, v, heads, scale);
  const int64_t b = q.size(0), tq = q.size(1), tk = k.size(1), d = q.size(2) / heads;
  auto split = [&](const at::Tensor& t, int64_t len) {
    return t.reshape({b, len, heads, d}).transpose(1, 2);
  };
  const auto qs = (q.to(at::kFloat) * scale).to(at::kBFloat16).to(at::kDouble);
  const auto probs =
      at::softmax(at::matmul(split(qs, tq), split(k.to(at::kDouble), tk).transpose(-1, -2)), -1);
  const auto vv = split(v.to(at::kDouble), tk);
  const auto ref = at::matmul(probs, vv).transpose(1, 2).reshape({b, tq, heads * d});
  const auto bound = (at::matmul(probs, vv.abs()).transpose(1, 2).reshape({b, tq, heads * d}) + ref.abs()) *
                         std::ldexp(1.0, -8) +
                     1e-6;
  ASSERT_EQ(got.sizes(), ref.sizes()) << what;
  const double ratio = ((got.to(at::kDouble) - ref).abs() / bound).max().item<double>();
  EXPECT_LE(ratio, 1.0) << what << ": error reaches " << ratio << " x the bound";
}

TEST_F(AmxAttention, AttentionMatchesFloat64) {
  at::manual_seed(7);
  struct Case {
    int64_t batch, queries, keys, heads, head_dim;
  };
  for (const Case c : {Case{1, 257, 257, 16, 88}, Case{2, 33, 5, 2, 64}, Case{1, 1, 40, 3, 8},
                       Case{2, 17, 70, 1, 130}, Case{1, 64, 600, 2, 32}}) {
    const int64_t width = c.heads * c.head_dim;
    // q, k, v as views of one fused product [B, T, 3 * width] (strided rows), as in the ViT.
    const auto qkv = (at::randn({c.batch, std::max(c.queries, c.keys), 3 * width}) * 2).to(at::kBFloat16);
    const auto q = qkv.narrow(1, 0, c.queries).narrow(2, 0, width);
    const auto k = qkv.narrow(1, 0, c.keys).narrow(2, width, width);
    const auto v = qkv.narrow(1, 0, c.keys).narrow(2, 2 * width, width);
    expect_attention_close(q, k, v, c.heads, 1.0 / std::sqrt(double(c.head_dim)),
                           "q " + std::to_string(c.queries) + " k " + std::to_string(c.keys) + " heads " +
                               std::to_string(c.heads) + " d " + std::to_string(c.head_dim));
  }
}

TEST_F(AmxAttention, AttentionRejectsBadArguments) {
  const auto x = at::randn({1, 4, 16}).to(at::kBFloat16);
  EXPECT_THROW(amx_attention(x, x, x, 3, 1.0), ArgumentError);                 // 16 % 3
  EXPECT_THROW(amx_attention(x.to(at::kFloat), x, x, 2, 1.0), ArgumentError);  // dtype
  EXPECT_THROW(amx_attention(x, x, at::randn({1, 5, 16}).to(at::kBFloat16), 2, 1.0),
               ArgumentError);  // v rows
  EXPECT_THROW(amx_attention(x, at::randn({1, kAmxAttentionMaxKeys + 1, 16}).to(at::kBFloat16),
                             at::randn({1, kAmxAttentionMaxKeys + 1, 16}).to(at::kBFloat16), 2, 1.0),
               ArgumentError);
}

// layer_norm_bf16 equals at::layer_norm in float32 rounded to bf16, up to one bf16 step where the
// float32 results differ in the last bits (different summation orders).
TEST(Bf16Ops, LayerNormMatchesFloat32LayerNorm) {
  at::manual_seed(9);
  for (int64_t channels : {1, 7, 16, 100, 1408}) {
    const auto x = (at::randn({5, 33, channels}) * 3 + 1).to(at::kBFloat16);
    const auto weight = at::randn({channels}), bias = at::randn({channels});
    const auto got = layer_norm_bf16(x, weight, bias, 1e-6);
    const auto ref = at::layer_norm(x.to(at::kFloat), {channels}, weight, bias, 1e-6);
    ASSERT_EQ(got.scalar_type(), at::kBFloat16);
    const auto step = ref.abs() * std::ldexp(1.0, -8) + 1e-6;
    EXPECT_LE(((got.to(at::kFloat) - ref).abs() / step).max().item<double>(), 1.0) << channels;
    // Strided rows (a view) give the same result.
    const auto wide = at::cat({x, x}, -1).narrow(-1, 0, channels);
    EXPECT_TRUE(at::equal(layer_norm_bf16(wide, weight, bias, 1e-6), got));
  }
  EXPECT_THROW(layer_norm_bf16(at::randn({2, 4}), {}, {}, 1e-5), ArgumentError);
  EXPECT_THROW(layer_norm_bf16(at::randn({2, 4}).to(at::kBFloat16), at::ones({3}), {}, 1e-5), ArgumentError);
}

}  // namespace
}  // namespace voken::core
