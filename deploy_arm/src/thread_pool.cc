#include "dgms_rt/thread_pool.h"

#include <algorithm>

namespace dgms_rt {

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
    stopping_ = true;
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
  {
    std::lock_guard<std::mutex> lock(mutex_);
    fn_ = &fn;
    count_ = count;
    next_.store(0);
    active_workers_ = static_cast<int>(workers_.size());
    ++generation_;
  }
  start_cv_.notify_all();

  run_items();

  // Every worker takes part in every generation, so fn_ stays valid until
  // the last of them has stopped taking items.
  std::unique_lock<std::mutex> lock(mutex_);
  done_cv_.wait(lock, [this] { return active_workers_ == 0; });
  fn_ = nullptr;
}

void ThreadPool::worker_loop() {
  uint64_t seen_generation = 0;
  while (true) {
    {
      std::unique_lock<std::mutex> lock(mutex_);
      start_cv_.wait(lock, [&] {
        return stopping_ || generation_ != seen_generation;
      });
      if (stopping_) return;
      seen_generation = generation_;
    }

    run_items();

    std::lock_guard<std::mutex> lock(mutex_);
    if (--active_workers_ == 0) done_cv_.notify_one();
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
