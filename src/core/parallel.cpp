#include "core/parallel.h"

#include <ATen/Parallel.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <string>
#include <thread>

#include "voken/error.h"

namespace voken::core {
namespace {

// libgomp's entry point for `#pragma omp parallel` (GCC's OpenMP ABI): runs fn(data) on a team of
// `threads` threads, the caller included, and returns when all have finished.
using GompParallel = void (*)(void (*fn)(void*), void* data, unsigned threads, unsigned flags);

GompParallel gomp_parallel() {
  static const auto fn = reinterpret_cast<GompParallel>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  return fn;
}

struct Work {
  const std::function<void(int64_t)>* body = nullptr;
  int64_t count = 0;
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  std::mutex mutex;
  std::exception_ptr error;
};

void run_items(void* data) {
  auto& work = *static_cast<Work*>(data);
  for (;;) {
    const int64_t item = work.next.fetch_add(1, std::memory_order_relaxed);
    if (item >= work.count || work.failed.load(std::memory_order_relaxed)) return;
    try {
      (*work.body)(item);
    } catch (...) {
      const std::lock_guard<std::mutex> lock(work.mutex);
      if (!work.error) work.error = std::current_exception();
      work.failed.store(true, std::memory_order_relaxed);
    }
  }
}

}  // namespace

int parallel_threads() { return std::max(1, at::get_num_threads()); }

int automatic_thread_count() {
  if (std::getenv("OMP_NUM_THREADS")) return at::get_num_threads();
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

void set_intra_op_threads(int requested, const std::string& what) {
  if (requested < 0)
    throw ArgumentError(what + " must be >= 0 (0: automatic), got " + std::to_string(requested));
  const int threads = requested > 0 ? requested : automatic_thread_count();
  if (threads != at::get_num_threads()) at::set_num_threads(threads);
}

void parallel_items(int64_t count, const std::function<void(int64_t item)>& body) {
  if (count <= 0) return;
  const int64_t threads = std::min<int64_t>(parallel_threads(), count);
  const GompParallel gomp = gomp_parallel();
  if (threads <= 1 || !gomp || at::in_parallel_region()) {
    for (int64_t item = 0; item < count; ++item) body(item);
    return;
  }
  Work work;
  work.body = &body;
  work.count = count;
  gomp(&run_items, &work, static_cast<unsigned>(threads), 0);
  if (work.error) std::rethrow_exception(work.error);
}

void parallel_range(int64_t begin, int64_t end, int64_t grain,
                    const std::function<void(int64_t begin, int64_t end)>& body) {
  if (begin >= end) return;
  const int64_t n = end - begin;
  const int64_t per_thread_chunks = 4;
  const int64_t chunk =
      std::max<int64_t>(std::max<int64_t>(1, grain), (n + parallel_threads() * per_thread_chunks - 1) /
                                                         (parallel_threads() * per_thread_chunks));
  const int64_t chunks = (n + chunk - 1) / chunk;
  parallel_items(chunks, [&](int64_t index) {
    const int64_t b = begin + index * chunk;
    body(b, std::min(end, b + chunk));
  });
}

}  // namespace voken::core
