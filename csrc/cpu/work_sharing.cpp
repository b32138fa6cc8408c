// The helper pool behind run_units (work_sharing.h).
#include "work_sharing.h"

#include <ATen/Parallel.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

namespace recjpq_cpu {
namespace {

// One run_units call. Helpers hold it by shared_ptr, so one that wakes after the call returned
// still reads a live counter, finds every unit claimed, and leaves without touching fn or ctx.
struct Job {
  void (*fn)(void*, int64_t, int);
  void* ctx;
  int64_t num_units;
  int max_slots;
  std::atomic<int64_t> next{0};  // next unclaimed unit
  std::atomic<int64_t> done{0};  // units finished
  std::atomic<int> slots{1};     // slot 0 is the caller's

  // Claims and runs units until none is left.
  void work(int slot) {
    for (int64_t unit; (unit = next.fetch_add(1, std::memory_order_relaxed)) < num_units;) {
      fn(ctx, unit, slot);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

class Pool {
 public:
  // Publishes a job for up to `helpers` helpers, starting threads the pool lacks.
  void offer(const std::shared_ptr<Job>& job, int helpers) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (started_ < helpers) {
        std::thread([this] { serve(); }).detach();
        ++started_;
      }
      job_ = job;
      wanted_ = helpers;
      ++generation_;
    }
    if (helpers == 1) {
      wake_.notify_one();
    } else {
      wake_.notify_all();
    }
  }

 private:
  void serve() {
    uint64_t seen = 0;
    for (;;) {
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen && wanted_ > 0; });
        seen = generation_;
        --wanted_;
        job = job_;
      }
      const int slot = job->slots.fetch_add(1, std::memory_order_relaxed);
      if (slot < job->max_slots) job->work(slot);
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Job> job_;
  uint64_t generation_ = 0;
  int wanted_ = 0, started_ = 0;
};

// Leaked on purpose: detached helpers may still wait on it while the process exits. A forked child
// has none of the parent's threads (and maybe a mutex locked by one), so it starts a pool of its own.
std::atomic<Pool*> pool{nullptr};

Pool& the_pool() {
  Pool* p = pool.load(std::memory_order_acquire);
  if (p) return *p;
  static std::once_flag once;
  std::call_once(once, [] {
    pool.store(new Pool, std::memory_order_release);
    pthread_atfork(nullptr, nullptr, [] { pool.store(new Pool, std::memory_order_release); });
  });
  return *pool.load(std::memory_order_acquire);
}

}  // namespace

int work_threads() { return std::max(1, at::get_num_threads()); }

void run_units(int64_t num_units, int threads, void (*fn)(void*, int64_t, int), void* ctx) {
  if (threads <= 0) threads = work_threads();
  const int helpers = static_cast<int>(std::min<int64_t>(threads, num_units)) - 1;
  if (helpers <= 0 || at::in_parallel_region()) {
    for (int64_t unit = 0; unit < num_units; ++unit) fn(ctx, unit, 0);
    return;
  }
  auto job = std::make_shared<Job>();
  job->fn = fn;
  job->ctx = ctx;
  job->num_units = num_units;
  job->max_slots = threads;
  the_pool().offer(job, helpers);
  job->work(0);
  // every unit is claimed; wait for the ones helpers are still running (spin briefly, then yield)
  for (int spins = 0; job->done.load(std::memory_order_acquire) < num_units; ++spins) {
    if (spins > 64) std::this_thread::yield();
  }
}

}  // namespace recjpq_cpu
