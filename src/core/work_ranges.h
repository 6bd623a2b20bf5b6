// Work items [0, items) shared by a fixed set of threads: thread t first takes items from the
// front of its own contiguous share (so its weight reads form one sequential run, and the item
// after the current one is known in advance for prefetching), then steals from the back of the
// others' shares, so that a thread that loses its core to another process leaves its remaining
// work to the others instead of holding up the whole parallel region. Lock-free: front and back
// of each share live in one 64-bit word.
#pragma once

#include <atomic>
#include <cstdint>
#include <vector>

namespace voken::core {

class WorkRanges {
 public:
  WorkRanges(int64_t items, int64_t threads) : ranges_(static_cast<size_t>(threads < 1 ? 1 : threads)) {
    const int64_t n = static_cast<int64_t>(ranges_.size());
    for (int64_t t = 0; t < n; ++t) {
      const auto front = static_cast<uint64_t>(items * t / n);
      const auto back = static_cast<uint64_t>(items * (t + 1) / n);
      ranges_[static_cast<size_t>(t)].word.store(front << 32 | back, std::memory_order_relaxed);
    }
  }

  // The next item for thread t, or -1 when everything is taken.
  int64_t next(int64_t t) {
    const int64_t own = take(ranges_[static_cast<size_t>(t)], /*from_front=*/true);
    if (own >= 0) return own;
    const int64_t n = static_cast<int64_t>(ranges_.size());
    for (int64_t i = 1; i < n; ++i) {
      const int64_t stolen = take(ranges_[static_cast<size_t>((t + i) % n)], /*from_front=*/false);
      if (stolen >= 0) return stolen;
    }
    return -1;
  }

  // The item thread t would take next from its own share (it may still be stolen), or -1.
  int64_t peek(int64_t t) const {
    const uint64_t word = ranges_[static_cast<size_t>(t)].word.load(std::memory_order_relaxed);
    return (word >> 32) < (word & 0xFFFFFFFFu) ? static_cast<int64_t>(word >> 32) : -1;
  }

 private:
  struct alignas(64) Range {
    std::atomic<uint64_t> word{0};
  };
  static int64_t take(Range& r, bool from_front) {
    uint64_t word = r.word.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t front = word >> 32, back = word & 0xFFFFFFFFu;
      if (front >= back) return -1;
      const uint64_t updated = from_front ? (front + 1) << 32 | back : front << 32 | (back - 1);
      if (r.word.compare_exchange_weak(word, updated, std::memory_order_relaxed))
        return static_cast<int64_t>(from_front ? front : back - 1);
    }
  }
  std::vector<Range> ranges_;
};

}  // namespace voken::core
