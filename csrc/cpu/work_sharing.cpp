// The helper pool behind run_units (work_sharing.h).
#include "work_sharing.h"

#include <ATen/Parallel.h>
#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

namespace recjpq_cpu {
namespace {

constexpr auto kPoll = std::chrono::microseconds(200);  // Pool::poll_for_next

enum SlotState : int { kIdle = 0, kRunning = 1, kFinished = 2, kRevoked = 3 };

// One run_units call. Helpers hold it by shared_ptr, so one that wakes after the call returned
// still reads a live counter, finds every unit claimed, and leaves without touching fn or ctx
// (a revocable call's ctx lives in `keep`, which the Job owns).
struct Job {
  void (*fn)(void*, int64_t, int);
  void* ctx;
  std::shared_ptr<void> keep;
  int64_t num_units;
  int max_slots;
  bool revocable;
  alignas(64) std::atomic<int64_t> next{0};  // next unclaimed unit
  alignas(64) std::atomic<int64_t> done{0};  // units finished (run_units waits for all of them)
  std::atomic<int> slots{1};     // slot 0 is the caller's
  std::unique_ptr<std::atomic<int>[]> state;    // per slot (revocable only)
  std::unique_ptr<std::atomic<int>[]> done_by;  // per unit: the slot that finished it (revocable only)

  Job(void (*fn_)(void*, int64_t, int), void* ctx_, std::shared_ptr<void> keep_, int64_t num_units_, int max_slots_,
      bool revocable_)
      : fn(fn_), ctx(ctx_), keep(std::move(keep_)), num_units(num_units_), max_slots(max_slots_),
        revocable(revocable_) {
    if (!revocable) return;
    state.reset(new std::atomic<int>[max_slots]);
    for (int s = 0; s < max_slots; ++s) state[s].store(s == 0 ? kRunning : kIdle, std::memory_order_relaxed);
    done_by.reset(new std::atomic<int>[num_units]);
    for (int64_t u = 0; u < num_units; ++u) done_by[u].store(-1, std::memory_order_relaxed);
  }

  // Claims and runs units until none is left (or, revocable, until the slot is revoked). A claim
  // takes a run of consecutive units, a share of what is left (guided self-scheduling), so a slot
  // streams through contiguous codes and the shared counter's cache line moves between cores a few
  // times a call: one claim per unit made two threads scanning 10 MB take 0.17 ms against 0.15 ms
  // for runs (0.144 ms for fixed halves), as their prefetchers restarted and the line bounced at
  // every unit. The runs shrink to one unit at the end, so the slots still finish together.
  void work(int slot) {
    if (revocable) {
      int idle = kIdle;
      if (slot != 0 && !state[slot].compare_exchange_strong(idle, kRunning)) return;  // revoked before joining
    }
    auto running = [&] { return !revocable || state[slot].load(std::memory_order_relaxed) == kRunning; };
    int64_t first = next.load(std::memory_order_relaxed);
    while (first < num_units && running()) {
      const int64_t run = std::max<int64_t>(1, (num_units - first) / (2 * max_slots));
      if (!next.compare_exchange_weak(first, first + run, std::memory_order_relaxed)) continue;
      int64_t unit = first;
      for (; unit < first + run && running(); ++unit) {
        fn(ctx, unit, slot);
        if (revocable) done_by[unit].store(slot, std::memory_order_relaxed);
      }
      done.fetch_add(unit - first, std::memory_order_release);
      first = next.load(std::memory_order_relaxed);
    }
    if (revocable && slot != 0) {
      int was_running = kRunning;
      state[slot].compare_exchange_strong(was_running, kFinished);  // fails if the caller revoked it first
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
      published_.store(++generation_, std::memory_order_release);
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
      poll_for_next(seen);
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

  // Back-to-back calls (a server's stream, a batch loop) come tens of microseconds apart, and a
  // sleeping helper joined a B = 1 scan of 1.27M items 5-6 us late (12 of 621 units gone), so a
  // helper polls for the next job for kPoll before it sleeps, as OpenMP runtimes do. It yields
  // between polls: on a loaded machine a thread that wants the core (the caller itself, or the
  // other work) gets it, where a spin would take its time slices.
  void poll_for_next(uint64_t seen) const {
    const auto until = std::chrono::steady_clock::now() + kPoll;
    while (published_.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
      std::this_thread::yield();
  }

  std::atomic<uint64_t> published_{0};
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

namespace {

// The helpers run_units may use: none inside an at::parallel_for region (that thread is a helper already).
int helpers_for(int64_t num_units, int threads) {
  return at::in_parallel_region() ? 0 : static_cast<int>(std::min<int64_t>(threads, num_units)) - 1;
}

constexpr auto kGrace = std::chrono::microseconds(30);  // what a running helper gets to finish its unit

}  // namespace

void run_units(int64_t num_units, int threads, void (*fn)(void*, int64_t, int), void* ctx) {
  if (threads <= 0) threads = work_threads();
  const int helpers = helpers_for(num_units, threads);
  if (helpers <= 0) {
    for (int64_t unit = 0; unit < num_units; ++unit) fn(ctx, unit, 0);
    return;
  }
  auto job = std::make_shared<Job>(fn, ctx, nullptr, num_units, threads, false);
  the_pool().offer(job, helpers);
  job->work(0);
  // every unit is claimed; wait for the ones helpers are still running (spin briefly, then yield)
  for (int spins = 0; job->done.load(std::memory_order_acquire) < num_units; ++spins) {
    if (spins > 64) std::this_thread::yield();
  }
}

std::vector<char> run_units_revocable(int64_t num_units, int threads, void (*fn)(void*, int64_t, int),
                                      std::shared_ptr<void> keep) {
  if (threads <= 0) threads = work_threads();
  std::vector<char> counted(threads + 1, 0);
  counted[0] = 1;
  void* ctx = keep.get();
  const int helpers = helpers_for(num_units, threads);
  if (helpers <= 0) {
    for (int64_t unit = 0; unit < num_units; ++unit) fn(ctx, unit, 0);
    return counted;
  }
  auto job = std::make_shared<Job>(fn, ctx, std::move(keep), num_units, threads, true);
  the_pool().offer(job, helpers);
  job->work(0);
  // every unit is claimed: a running helper gets kGrace to finish, then its slot is revoked
  const auto deadline = std::chrono::steady_clock::now() + kGrace;
  for (int s = 1; s < threads; ++s) {
    while (job->state[s].load(std::memory_order_acquire) == kRunning && std::chrono::steady_clock::now() < deadline) {
    }
    int seen = job->state[s].load(std::memory_order_acquire);
    while (seen != kFinished && !job->state[s].compare_exchange_weak(seen, kRevoked)) {
    }
    counted[s] = seen == kFinished;
  }
  // units no counted slot finished: run them here, in increasing order, as the spare slot
  for (int64_t unit = 0; unit < num_units; ++unit) {
    const int by = job->done_by[unit].load(std::memory_order_relaxed);
    if (by >= 0 && counted[by]) continue;
    fn(ctx, unit, threads);
    counted[threads] = 1;
  }
  return counted;
}

}  // namespace recjpq_cpu
