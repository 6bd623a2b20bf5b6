// The core parallel loops (core/parallel.h). The kernels have their own
// suites, each over every CPU tier: test_packed_gemm, test_inplace_gemm, test_attention, test_gemv,
// test_norm_kernels.
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

}  // namespace
}  // namespace voken::core
