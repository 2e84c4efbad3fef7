// What the CPU kernels share: 16-float vectors (GCC vector extensions, -O3 -march=native) and
// a parallel loop on XLA's intra-op thread pool.
#ifndef FIFA_JAX_KERNELS_COMMON_H_
#define FIFA_JAX_KERNELS_COMMON_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace fifa_kernels {

constexpr int64_t kLanes = 16;  // floats a vector (AVX-512; the compiler splits it elsewhere)

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float)), aligned(4)));

inline Vec Load(const float* p) { return *reinterpret_cast<const Vec*>(p); }
inline void Store(float* p, Vec v) { *reinterpret_cast<Vec*>(p) = v; }
inline int64_t RoundUp(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Runs fn(item) for item in [0, count) on the pool and the calling thread, which takes items
// too (so it never waits on a task that has not started). Items must write disjoint outputs;
// results then do not depend on the thread count or the scheduling.
inline void ParallelFor(ffi::ThreadPool& pool, int64_t count,
                        const std::function<void(int64_t)>& fn) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
    int64_t count = 0;
    const std::function<void(int64_t)>* fn = nullptr;
  };
  auto shared = std::make_shared<Shared>();
  shared->count = count;
  shared->fn = &fn;
  auto work = [](Shared* s) {
    for (int64_t i = s->next.fetch_add(1); i < s->count; i = s->next.fetch_add(1)) {
      (*s->fn)(i);
      if (s->done.fetch_add(1) + 1 == s->count) {
        std::lock_guard<std::mutex> lock(s->mu);
        s->cv.notify_all();
      }
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), count) - 1;
  for (int64_t t = 0; t < helpers; ++t) {
    // A late task finds no items left and touches only `shared` (kept alive by the copy).
    pool.Schedule([shared, work]() { work(shared.get()); });
  }
  work(shared.get());
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == count; });
}

}  // namespace fifa_kernels

#endif  // FIFA_JAX_KERNELS_COMMON_H_
