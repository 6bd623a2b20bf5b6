// The core kernels: the parallel loops (core/parallel.h), and the AMX-BF16 linear kernel
// (core/amx_gemm.h) against at::linear in float64 on the same
// bf16-rounded inputs, over shapes that exercise every edge: token counts that are no multiple
// of 16 or 32, weight rows that leave partial 16/32-row blocks, row lengths that are no multiple
// of 32, strided weights, several weights in one call, inputs split into several passes, bias,
// activations, float32 and bf16 inputs and outputs.
//
// Tolerance: the kernel rounds x to bf16 (as the reference does here), multiplies exactly and
// sums in float32 (K / 2 sequential pair additions per output in the worst case), so
//   |y - ref| <= K * 2^-24 * (|x| |W|^T)  (+ 2^-8 |ref| when the output is rounded to bf16).
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
#include "core/inplace_gemm.h"
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

at::Tensor reference(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                     Activation activation) {
  const auto x64 = x.to(at::kBFloat16).to(at::kDouble);
  auto y = at::linear(x64, w.to(at::kDouble), bias.defined() ? bias.to(at::kDouble) : at::Tensor());
  if (activation == Activation::GeluErf) y = at::gelu(y);
  if (activation == Activation::GeluTanh) y = at::gelu(y, "tanh");
  return y;
}

// Passes when every element is within the bound above; reports the worst ratio otherwise.
void expect_close(const at::Tensor& got, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                  Activation activation, const std::string& what) {
  const auto ref = reference(x, w, bias, activation);
  const auto magnitude = at::linear(x.to(at::kBFloat16).to(at::kDouble).abs(), w.to(at::kDouble).abs());
  auto bound = magnitude * (static_cast<double>(w.size(1)) * std::ldexp(1.0, -24)) + 1e-30;
  if (got.scalar_type() == at::kBFloat16) bound = bound + ref.abs() * std::ldexp(1.0, -8);
  // GELU's slope is at most 1.13 in magnitude, and the kernel's GELU itself is good to ~1e-7.
  if (activation != Activation::None) bound = bound * 1.13 + 1e-6;
  ASSERT_EQ(got.sizes(), ref.sizes()) << what;
  const auto ratio = ((got.to(at::kDouble) - ref).abs() / bound).max().item<double>();
  EXPECT_LE(ratio, 1.0) << what << ": error reaches " << ratio << " x the bound";
}

class AmxGemm : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!inplace_gemm_supported())
      GTEST_SKIP() << "this CPU/OS offers no AMX-BF16; the kernel is not used here";
  }
};

TEST_F(AmxGemm, MatchesFloat64AcrossShapes) {
  at::manual_seed(3);
  for (int64_t m : {1, 5, 16, 17, 33, 130}) {
    for (int64_t n : {16, 32, 40, 77}) {
      for (int64_t k : {32, 64, 100, 1408}) {
        const auto x = at::randn({m, k});
        const auto w = (at::randn({n, k}) * 0.1).to(at::kBFloat16);
        const auto bias = at::randn({n});
        const std::string what =
            "m " + std::to_string(m) + " n " + std::to_string(n) + " k " + std::to_string(k);
        expect_close(inplace_linear(x, w), x, w, {}, Activation::None, what);
        expect_close(inplace_linear(x, w, bias, at::kBFloat16), x, w, bias, Activation::None,
                     what + " bf16 out");
      }
    }
  }
}

TEST_F(AmxGemm, SeveralPassesOverLongRows) {
  // 13 token blocks: passes of 78 steps of 32 inputs, so 2600 inputs take two passes.
  at::manual_seed(4);
  for (int64_t k : {2600, 5000}) {
    const auto x = at::randn({200, k}).to(at::kBFloat16);
    const auto w = (at::randn({72, k}) * 0.05).to(at::kBFloat16);
    const auto bias = at::randn({72});
    expect_close(inplace_linear(x, w, bias), x, w, bias, Activation::None, "k " + std::to_string(k));
    expect_close(inplace_linear(x, w, bias, at::kBFloat16, Activation::GeluErf), x, w, bias,
                 Activation::GeluErf, "gelu k " + std::to_string(k));
  }
}

TEST_F(AmxGemm, StridedWeightsBatchedInputAndActivations) {
  at::manual_seed(5);
  const auto big = (at::randn({100, 200}) * 0.1).to(at::kBFloat16);
  const auto w = big.narrow(0, 3, 64).narrow(1, 10, 160);  // row stride 200
  const auto x = at::randn({2, 37, 160});
  const auto bias = at::randn({64}).to(at::kBFloat16);
  for (auto activation : {Activation::None, Activation::GeluErf, Activation::GeluTanh}) {
    const auto y = inplace_linear(x, w, bias, at::kFloat, activation);
    ASSERT_EQ(y.sizes(), at::IntArrayRef({2, 37, 64}));
    expect_close(y.reshape({74, 64}), x.reshape({74, 160}), w, bias, activation, "strided");
  }
}

TEST_F(AmxGemm, SeveralWeightsInOneCall) {
  at::manual_seed(6);
  const auto x = at::randn({45, 96});
  std::vector<InplaceLinearJob> jobs;
  for (int64_t n : {96, 48, 48, 7})
    jobs.push_back({(at::randn({n, 96}) * 0.1).to(at::kBFloat16), at::randn({n}), Activation::None, {}});
  jobs[1].activation = Activation::GeluErf;
  for (int threads : {1, 2}) {
    at::set_num_threads(threads);
    const auto ys = inplace_linear_many(x, jobs, at::kFloat);
    ASSERT_EQ(ys.size(), jobs.size());
    for (size_t i = 0; i < jobs.size(); ++i)
      expect_close(ys[i], x, jobs[i].weight, jobs[i].bias, jobs[i].activation, "job " + std::to_string(i));
  }
}

TEST_F(AmxGemm, ResidualIsAddedBeforeTheRounding) {
  at::manual_seed(8);
  const auto x = at::randn({3, 50, 64});
  const auto w = (at::randn({40, 64}) * 0.1).to(at::kBFloat16);
  const auto bias = at::randn({40});
  for (auto dtype : {at::kFloat, at::kBFloat16}) {
    const auto residual = at::randn({3, 50, 40}).to(dtype);
    const auto got = inplace_linear(x, w, bias, at::kBFloat16, Activation::GeluErf, residual);
    // Reference: float64 of the same bf16-rounded x, the residual added, then one bf16 rounding.
    const auto ref =
        at::gelu(at::linear(x.to(at::kBFloat16).to(at::kDouble), w.to(at::kDouble), bias.to(at::kDouble))) +
        residual.to(at::kDouble);
    const auto bound = at::linear(x.to(at::kBFloat16).to(at::kDouble).abs(), w.to(at::kDouble).abs()) *
                           (64 * std::ldexp(1.0, -24) * 1.13) +
                       ref.abs() * std::ldexp(1.0, -8) + 1e-6;
    EXPECT_LE(((got.to(at::kDouble) - ref).abs() / bound).max().item<double>(), 1.0) << c10::toString(dtype);
  }
  EXPECT_THROW(inplace_linear(x, w, bias, at::kFloat, Activation::None, at::randn({3, 50, 41})),
               ArgumentError);
}

TEST_F(AmxGemm, EmptyInputGivesEmptyOutput) {
  const auto w = at::ones({8, 32}, at::kBFloat16);
  EXPECT_EQ(inplace_linear(at::zeros({0, 32}), w).sizes(), at::IntArrayRef({0, 8}));
}

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

TEST_F(AmxGemm, AttentionMatchesFloat64) {
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

TEST_F(AmxGemm, AttentionRejectsBadArguments) {
  const auto x = at::randn({1, 4, 16}).to(at::kBFloat16);
  EXPECT_THROW(amx_attention(x, x, x, 3, 1.0), ArgumentError);                 // 16 % 3
  EXPECT_THROW(amx_attention(x.to(at::kFloat), x, x, 2, 1.0), ArgumentError);  // dtype
  EXPECT_THROW(amx_attention(x, x, at::randn({1, 5, 16}).to(at::kBFloat16), 2, 1.0),
               ArgumentError);  // v rows
  EXPECT_THROW(amx_attention(x, at::randn({1, kAmxAttentionMaxKeys + 1, 16}).to(at::kBFloat16),
                             at::randn({1, kAmxAttentionMaxKeys + 1, 16}).to(at::kBFloat16), 2, 1.0),
               ArgumentError);
}

TEST_F(AmxGemm, RejectsBadArguments) {
  const auto x = at::randn({4, 32});
  EXPECT_THROW(inplace_linear(x, at::randn({8, 32})), ArgumentError);                    // float32 weight
  EXPECT_THROW(inplace_linear(x, at::randn({8, 16}).to(at::kBFloat16)), ArgumentError);  // K mismatch
  EXPECT_THROW(inplace_linear(x, at::randn({8, 32}).to(at::kBFloat16).t().contiguous().t()), ArgumentError);
  EXPECT_THROW(inplace_linear(x, at::randn({8, 32}).to(at::kBFloat16), at::randn({7})), ArgumentError);
  EXPECT_THROW(inplace_linear(x.to(at::kDouble), at::randn({8, 32}).to(at::kBFloat16)), ArgumentError);
  EXPECT_THROW(inplace_linear(x, at::randn({8, 32}).to(at::kBFloat16), {}, at::kDouble), ArgumentError);
}

}  // namespace
}  // namespace voken::core
