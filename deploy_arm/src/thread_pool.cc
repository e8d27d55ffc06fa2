#include "dgms_rt/thread_pool.h"

#include <algorithm>
#include <chrono>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace dgms_rt {
namespace {

// A hint to the core that this thread is spinning.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__) || defined(__arm__)
  asm volatile("yield");
#endif
}

// Spins until done() or for about `microseconds` and returns done(). It
// yields the core between rounds, so that spinning threads do not hold up
// the others when a pool has more threads than the machine has cores.
template <class Done>
bool spin_until(Done done, int microseconds) {
  const auto end = std::chrono::steady_clock::now() +
                   std::chrono::microseconds(microseconds);
  while (true) {
    for (int i = 0; i < 64; ++i) {
      if (done()) return true;
      cpu_relax();
    }
    if (std::chrono::steady_clock::now() >= end) return done();
    std::this_thread::yield();
  }
}

}  // namespace

ThreadPool::ThreadPool(int num_threads)
    : num_threads_(std::min(std::max(num_threads, 1), kMaxThreads)) {
  workers_.reserve(num_threads_ - 1);
  for (int i = 1; i < num_threads_; ++i) {
    workers_.emplace_back([this] { worker_loop(); });
  }
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_.store(true);
  }
  start_cv_.notify_all();
  for (std::thread& worker : workers_) worker.join();
}

void ThreadPool::parallel_for(int64_t count,
                              const std::function<void(int64_t)>& fn) {
  if (count <= 0) return;
  if (workers_.empty() || count == 1) {
    for (int64_t i = 0; i < count; ++i) fn(i);
    return;
  }

  std::lock_guard<std::mutex> loop_lock(loop_mutex_);
  fn_ = &fn;
  count_ = count;
  next_.store(0);
  active_workers_.store(static_cast<int>(workers_.size()));
  bool wake = false;
  {
    // Under the mutex, so that a worker about to sleep either reads the
    // new generation or is counted in sleeping_ and woken.
    std::lock_guard<std::mutex> lock(mutex_);
    generation_.fetch_add(1);
    wake = sleeping_ > 0;
  }
  if (wake) start_cv_.notify_all();

  run_items();

  // Every worker takes part in every generation, so fn_ stays valid until
  // the last of them has stopped taking items.
  const auto finished = [this] { return active_workers_.load() == 0; };
  if (!spin_until(finished, kSpinMicroseconds)) {
    std::unique_lock<std::mutex> lock(mutex_);
    done_cv_.wait(lock, finished);
  }
  fn_ = nullptr;
}

void ThreadPool::worker_loop() {
  uint64_t seen_generation = 0;
  while (true) {
    const auto started = [&] {
      return stopping_.load() || generation_.load() != seen_generation;
    };
    if (!spin_until(started, kSpinMicroseconds)) {
      std::unique_lock<std::mutex> lock(mutex_);
      ++sleeping_;
      start_cv_.wait(lock, started);
      --sleeping_;
    }
    if (stopping_.load()) return;
    seen_generation = generation_.load();

    run_items();

    if (active_workers_.fetch_sub(1) == 1) {
      // Under the mutex, so that parallel_for cannot check the count and
      // then miss this notification.
      std::lock_guard<std::mutex> lock(mutex_);
      done_cv_.notify_one();
    }
  }
}

void ThreadPool::run_items() {
  while (true) {
    const int64_t i = next_.fetch_add(1);
    if (i >= count_) return;
    (*fn_)(i);
  }
}

}  // namespace dgms_rt
