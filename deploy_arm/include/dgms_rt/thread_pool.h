// A fixed-size thread pool that runs one parallel loop at a time.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace dgms_rt {

class ThreadPool {
 public:
  // Starts num_threads - 1 worker threads, and the thread that calls
  // parallel_for is the remaining one. num_threads is clamped to
  // [1, kMaxThreads], and 1 runs every loop on the calling thread.
  explicit ThreadPool(int num_threads);
  ~ThreadPool();

  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  static constexpr int kMaxThreads = 256;

  int num_threads() const { return num_threads_; }

  // Calls fn(i) for every i in [0, count), spread over the pool's threads
  // with dynamic scheduling, and returns when all calls have returned.
  // fn must not throw and must not call parallel_for on the same pool
  // (that deadlocks). Concurrent calls from other threads are serialised.
  void parallel_for(int64_t count, const std::function<void(int64_t)>& fn);

 private:
  void worker_loop();
  void run_items();

  int num_threads_;
  std::vector<std::thread> workers_;

  std::mutex loop_mutex_;  // serialises parallel_for calls
  // A worker that has run a loop watches generation_ for the next one for
  // a while (kSpinMicroseconds) before it sleeps on start_cv_, and
  // parallel_for watches active_workers_ for as long before it sleeps on
  // done_cv_. A model runs hundreds of loops per image, microseconds
  // apart: waking sleeping threads for each made the demo detector about
  // 15 % slower on two threads.
  static constexpr int kSpinMicroseconds = 100;
  std::mutex mutex_;  // guards sleeping_, stopping_ and the waits
  std::condition_variable start_cv_;
  std::condition_variable done_cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> active_workers_{0};
  int sleeping_ = 0;  // workers waiting on start_cv_
  std::atomic<bool> stopping_{false};

  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t count_ = 0;
  std::atomic<int64_t> next_{0};
};

}  // namespace dgms_rt
