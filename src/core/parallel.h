// Parallel loops for voken's own kernels on libtorch's OpenMP thread team, the one parallel
// mechanism in voken (use these, never at::parallel_for).
//
// Why not at::parallel_for: in libtorch 1.13 it is a header template that parallelises only when
// the *calling* translation unit is compiled with OpenMP (_OPENMP defined); voken is built without
// -fopenmp, so every at::parallel_for in voken's own code would run on one thread. These helpers enter
// the same libgomp team libtorch and oneDNN use (GOMP_parallel, looked up at run time, so they work
// with or without -fopenmp and fall back to a plain loop when libgomp is absent), with
// at::get_num_threads() threads, and hand the work out dynamically: on a shared machine a
// descheduled thread then delays a step by one work item, not by its whole static share.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

namespace voken::core {

// Calls body(item) for every item in [0, count), items taken in increasing order from a shared
// counter by up to at::get_num_threads() threads (one thread when count is 1 or inside another
// parallel region). The first exception thrown by a body is rethrown here after all threads
// finish (other items may or may not have run).
void parallel_items(int64_t count, const std::function<void(int64_t item)>& body);

// The range [begin, end) cut into chunks of at least `grain` items (and about four per thread),
// each run as body(chunk_begin, chunk_end) as in parallel_items. Per-thread setup in `body`
// (scratch buffers, AMX tile configuration) is therefore repeated per chunk.
void parallel_range(int64_t begin, int64_t end, int64_t grain,
                    const std::function<void(int64_t begin, int64_t end)>& body);

// The number of threads parallel_items uses.
int parallel_threads();

// The thread count `num_threads = 0` means: $OMP_NUM_THREADS when set (libtorch read it already),
// else one thread per core.
int automatic_thread_count();

// Sets libtorch's intra-op thread count (the team every kernel, voken's and libtorch's, runs on):
// `requested` > 0 exactly; 0 automatically, i.e. $OMP_NUM_THREADS when set (libtorch read it
// already), else one thread per core. Why automatic: Debian's libtorch 1.13 starts with ONE
// thread on some multi-core machines (this project's 2-core CI machine among them). `what` names
// the option in the error a negative count gets.
void set_intra_op_threads(int requested, const std::string& what);

}  // namespace voken::core
