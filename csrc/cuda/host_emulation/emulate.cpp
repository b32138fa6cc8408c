// Runs the CUDA kernels of csrc/cuda (the very *_kernel.cuh sources) on CPU threads, so tests on
// machines without a GPU exercise their indexing, barriers and selection logic:
// one std::thread per CUDA thread, __syncthreads as a std::barrier, CTAs one after another
// (so a later CTA sees the thresholds earlier ones published), `__shared__` arrays as statics.
// Warp intrinsics (__ballot_sync, __shfl_sync) meet the warp's 32 threads at a WarpExchange.
// Restrictions: full mask only, and all 32 lanes call the same intrinsic at the same place in the
// source (stricter than CUDA, which asks only for the same intrinsic); otherwise the emulation
// aborts with a message (after kDivergenceTimeout when some lanes never arrive) instead of hanging.
// Built by tests/test_cuda_backend.py with g++ -std=c++20 -DRECJPQ_HOST_EMULATION; not part of
// the extension (setup.py compiles csrc/cuda/*.cu and *.cpp only).
#include <cuda_runtime_api.h>
#include <vector_types.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <barrier>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <source_location>
#include <thread>
#include <type_traits>
#include <vector>

// The CUDA headers define these as attributes for host compilers; the emulation needs them plain.
#undef __device__
#undef __host__
#undef __global__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(threads)
#define __shared__ static

thread_local uint3 threadIdx;
uint3 blockIdx;
dim3 blockDim, gridDim;

namespace {

constexpr int kLanes = 32;
constexpr auto kDivergenceTimeout = std::chrono::seconds(120);

[[noreturn]] void die(const char* what, const std::source_location& where) {
  std::fprintf(stderr, "host emulation: %s (%s:%u, threadIdx.x=%u)\n", what, where.file_name(),
               static_cast<unsigned>(where.line()), threadIdx.x);
  std::abort();
}

// Where one warp's 32 lanes meet at a warp intrinsic: each publishes a 64-bit value, waits for
// the other 31, then reads all 32. Two slot sets alternate by generation, so a lane that already
// moved on to the next intrinsic cannot overwrite values a slower lane has still to read.
class WarpExchange {
 public:
  // Publishes `value` for this lane and returns read(values of all lanes), read under the lock.
  template <typename Read>
  auto exchange(unsigned mask, uint64_t value, const std::source_location& where, Read read) {
    if (mask != 0xFFFFFFFFu) die("only full-mask warp intrinsics are emulated", where);
    const unsigned lane = threadIdx.x % kLanes;
    std::unique_lock lock(mutex_);
    const unsigned generation = generation_;
    Slots& slots = slots_[generation & 1];
    slots.value[lane] = value;
    slots.site[lane] = (uint64_t(where.line()) << 32) | where.column();
    if (++arrived_ == kLanes) {
      arrived_ = 0;
      ++generation_;
      all_arrived_.notify_all();
    } else if (!all_arrived_.wait_for(lock, kDivergenceTimeout, [&] { return generation_ != generation; })) {
      die("some lanes of this warp never reached the warp intrinsic (divergent call?)", where);
    }
    for (int other = 0; other < kLanes; ++other)
      if (slots.site[other] != slots.site[lane]) die("the lanes of a warp met at different warp intrinsics", where);
    return read(slots.value);
  }

 private:
  struct Slots {
    std::array<uint64_t, kLanes> value;
    std::array<uint64_t, kLanes> site;  // line and column of the intrinsic's call
  };
  std::mutex mutex_;
  std::condition_variable all_arrived_;
  unsigned arrived_ = 0, generation_ = 0;
  Slots slots_[2];
};

std::barrier<>* cta_barrier = nullptr;
WarpExchange* cta_warps = nullptr;  // blockDim.x / 32 of them, one per warp of the running CTA
char* cta_smem = nullptr;

WarpExchange& this_warp() { return cta_warps[threadIdx.x / kLanes]; }

}  // namespace

inline void __syncthreads() { cta_barrier->arrive_and_wait(); }
inline unsigned __ballot_sync(unsigned mask, int predicate,
                              std::source_location where = std::source_location::current()) {
  return this_warp().exchange(mask, predicate != 0, where, [](const std::array<uint64_t, kLanes>& votes) {
    unsigned ballot = 0;
    for (int lane = 0; lane < kLanes; ++lane) ballot |= static_cast<unsigned>(votes[lane]) << lane;
    return ballot;
  });
}
template <typename T>
inline T __shfl_sync(unsigned mask, T var, int src_lane, std::source_location where = std::source_location::current()) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof var);
  bits = this_warp().exchange(mask, bits, where, [&](const std::array<uint64_t, kLanes>& values) {
    return values[src_lane & (kLanes - 1)];  // CUDA's srcLane modulo the warp width
  });
  std::memcpy(&var, &bits, sizeof var);
  return var;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
template <typename T>
inline T __ldg(const T* p) { return *p; }
template <typename T>
inline T min(T a, T b) { return a < b ? a : b; }
inline int __float_as_int(float x) {
  int bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline long long atomicMax(long long* p, long long v) {
  std::atomic_ref<long long> ref(*p);
  long long old = ref.load();
  while (old < v && !ref.compare_exchange_weak(old, v)) {
  }
  return old;
}

#include "../pq_launch.h"
#include "../pq_scores_kernel.cuh"
#include "../pq_topk_kernel.cuh"

char* recjpq_cuda::dynamic_smem() { return cta_smem; }

namespace {

template <typename Kernel, typename... Args>
void run_grid(dim3 grid, size_t smem, Kernel kernel, Args... args) {
  void* buffer = std::aligned_alloc(16, std::max<size_t>(16, (smem + 15) & ~size_t(15)));
  cta_smem = static_cast<char*>(buffer);
  gridDim = grid;
  blockDim = dim3(recjpq_cuda::kThreads);
  for (unsigned y = 0; y < grid.y; ++y) {
    for (unsigned x = 0; x < grid.x; ++x) {
      blockIdx = make_uint3(x, y, 0);
      std::barrier<> barrier(recjpq_cuda::kThreads);
      std::vector<WarpExchange> warps(recjpq_cuda::kThreads / kLanes);
      cta_barrier = &barrier;
      cta_warps = warps.data();
      std::vector<std::thread> threads;
      for (unsigned t = 0; t < blockDim.x; ++t)
        threads.emplace_back([&, t] {
          threadIdx = make_uint3(t, 0, 0);
          kernel(args...);
        });
      for (auto& thread : threads) thread.join();
    }
  }
  std::free(buffer);
}

template <typename CodeT, int QB>
void topk(const float* S, const void* codes, const int64_t* exclude, int64_t E, int64_t B, int M, int K, int64_t N,
          int k, int len, int grid_x, int64_t* thresholds, int64_t* candidates) {
  const dim3 grid(grid_x, static_cast<unsigned>((B + QB - 1) / QB));
  run_grid(grid, recjpq_cuda::topk_smem_bytes(M, K, QB, len), recjpq_cuda::pq_topk_kernel<CodeT, QB>, S,
           static_cast<const CodeT*>(codes), exclude, E, B, M, K, N, k, len,
           recjpq_cuda::codes_vector_bytes<CodeT>(codes, M), thresholds, candidates);
}

template <typename CodeT, int QB>
void scores(const float* S, const void* codes, int64_t B, int M, int K, int64_t N, float* out, int grid_x) {
  const dim3 grid(grid_x, static_cast<unsigned>((B + QB - 1) / QB));
  run_grid(grid, recjpq_cuda::tables_bytes(M, K, QB), recjpq_cuda::pq_scores_kernel<CodeT, QB>, S,
           static_cast<const CodeT*>(codes), B, M, K, N, recjpq_cuda::codes_vector_bytes<CodeT>(codes, M), out);
}

// Calls f.template operator()<CodeT, QB>() for the runtime code width and query group.
template <typename F>
bool dispatch(int code_bytes, int query_group, F&& f) {
  auto by_group = [&]<typename CodeT>() {
    switch (query_group) {
      case 1: f.template operator()<CodeT, 1>(); return true;
      case 2: f.template operator()<CodeT, 2>(); return true;
      case 4: f.template operator()<CodeT, 4>(); return true;
      default: return false;
    }
  };
  switch (code_bytes) {
    case 1: return by_group.template operator()<uint8_t>();
    case 2: return by_group.template operator()<int16_t>();
    case 4: return by_group.template operator()<int32_t>();
    default: return false;
  }
}

}  // namespace

// The launchers' arguments (no stream) and checks; 0 when the kernel ran, 1 on a rejected argument.
extern "C" int emulate_pq_topk_candidates(const float* S, const void* codes, int code_bytes, const int64_t* exclude,
                                          int64_t E, int64_t B, int M, int K, int64_t N, int k, int buffer_len,
                                          int query_group, int grid_x, int64_t* thresholds, int64_t* candidates) {
  if (!recjpq_cuda::valid_problem(S, codes, code_bytes, B, M, K, N, query_group, grid_x) ||
      !recjpq_cuda::valid_topk(N, k, buffer_len, E, exclude, thresholds, candidates))
    return 1;
  return dispatch(code_bytes, query_group, [&]<typename CodeT, int QB>() {
           topk<CodeT, QB>(S, codes, exclude, E, B, M, K, N, k, buffer_len, grid_x, thresholds, candidates);
         }) ? 0 : 1;
}

extern "C" int emulate_pq_scores(const float* S, const void* codes, int code_bytes, int64_t B, int M, int K,
                                 int64_t N, float* out, int query_group, int grid_x) {
  if (!recjpq_cuda::valid_problem(S, codes, code_bytes, B, M, K, N, query_group, grid_x) || out == nullptr) return 1;
  return dispatch(code_bytes, query_group, [&]<typename CodeT, int QB>() {
           scores<CodeT, QB>(S, codes, B, M, K, N, out, grid_x);
         }) ? 0 : 1;
}

// The code load width the launchers pass for this codes pointer (16, 8 or 0 bytes), or -1.
extern "C" int emulate_codes_vector_bytes(const void* codes, int code_bytes, int M) {
  switch (code_bytes) {
    case 1: return recjpq_cuda::codes_vector_bytes<uint8_t>(codes, M);
    case 2: return recjpq_cuda::codes_vector_bytes<int16_t>(codes, M);
    case 4: return recjpq_cuda::codes_vector_bytes<int32_t>(codes, M);
    default: return -1;
  }
}

// warp_append (pq_topk_kernel.cuh) alone, on one CTA: in round r, thread t appends keys[r * 256 + t]
// if pass[r * 256 + t]. Returns the final count; out (rounds * 256 slots) receives the buffer.
extern "C" int emulate_warp_append(const int64_t* keys, const uint8_t* pass, int rounds, int64_t* out) {
  int count = 0;
  run_grid(dim3(1), 0, [&] {
    for (int r = 0; r < rounds; ++r) {
      const int j = r * recjpq_cuda::kThreads + static_cast<int>(threadIdx.x);
      recjpq_cuda::warp_append(reinterpret_cast<long long*>(out), &count, keys[j], pass[j] != 0);
    }
  });
  return count;
}
