// The work sharing of adderjax's native kernels over XLA's intra-op thread pool, shared by the
// float kernels (adder_forward_cpu.cc, adder_input_grad_cpu.cc, adder_weight_grad_cpu.cc), the
// integer ones (adder_int_cpu.cc) and BatchNorm's (batch_norm_cpu.cc).

#ifndef ADDERJAX_OPS_CSRC_PARALLEL_FOR_H_
#define ADDERJAX_OPS_CSRC_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace adderjax {

// Runs fn(item) for item in [0, total) on the calling thread and the pool.
// Work is claimed from a shared counter; the caller waits only for items
// claimed by running threads, so a helper that never starts cannot block it,
// and one that starts late finds nothing left and touches no buffer.
template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t total, const Fn& fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), total) - 1;
  const Fn* body = &fn;
  auto work = [state, body, total]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < total;) {
      (*body)(i);
      if (state->done.fetch_add(1) + 1 == total) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == total; });
}

// How many chunks to split each of `items` work items into so that there are about
// `per_thread` items for each thread (the caller's included), between 1 and `most` (1 where
// `most` is 0: an empty batch).
inline int64_t ChunksToFill(xla::ffi::ThreadPool& pool, int64_t items, int64_t per_thread,
                            int64_t most) {
  const int64_t wanted = per_thread * (pool.num_threads() + 1), n = std::max<int64_t>(items, 1);
  return std::clamp<int64_t>((wanted + n - 1) / n, 1, std::max<int64_t>(most, 1));
}

}  // namespace adderjax

#endif  // ADDERJAX_OPS_CSRC_PARALLEL_FOR_H_
