// Exhaustive fused PQ scoring and top-k over the blocked code layout.
//
// The catalogue is cut into chunks of 2,048 items, shared out by caller-runs work sharing
// (work_sharing.h): the calling thread scans chunks itself and never waits for a helper thread the
// OS has not scheduled yet. A chunk is scored for every query (of its group) before the next, so
// one load of its codes (kept in L1/L2) serves the whole batch. Each (thread slot, query) keeps an
// AscendingTopK whose threshold filters most items inside the SIMD scorer; the buffers are merged
// per query at the end. Memory is O(threads x B x k), never B x N.
#include "pq_common.h"

#include <ATen/Parallel.h>

#include <memory>
#include <mutex>
#include <optional>

#include "work_sharing.h"

namespace recjpq_cpu {

ExcludeLists::ExcludeLists(const c10::optional<at::Tensor>& exclude, int64_t batch, int64_t n) {
  if (!exclude.has_value() || exclude->numel() == 0) return;
  TORCH_CHECK(exclude->dim() == 2 && exclude->size(0) == batch && exclude->scalar_type() == at::kLong &&
                  exclude->is_contiguous(),
              "recjpq_cpu: exclude must be contiguous int64 [B, E]");
  const int64_t width = exclude->size(1);
  const int64_t* data = exclude->data_ptr<int64_t>();
  lists_.resize(batch);
  for (int64_t b = 0; b < batch; ++b) {
    auto& ids = lists_[b];
    for (int64_t e = 0; e < width; ++e) {
      const int64_t id = data[b * width + e];
      TORCH_CHECK_VALUE(id >= -1 && id < n, "exclude ids must be in [-1, N=", n, "), got ", id, " in row ", b);
      if (id >= 0) ids.push_back(id);
    }
    std::sort(ids.begin(), ids.end());
  }
}

void write_topk(std::vector<int64_t>& keys, int64_t k, float* values, int64_t* indices) {
  const int64_t found = std::min<int64_t>(k, keys.size());
  if (found < static_cast<int64_t>(keys.size()))  // then sort the best `found`: cheaper than a partial sort
    std::nth_element(keys.begin(), keys.begin() + (found - 1), keys.end(), std::greater<int64_t>());
  std::sort(keys.begin(), keys.begin() + found, std::greater<int64_t>());
  for (int64_t j = 0; j < found; ++j) {
    values[j] = key_score(keys[j]);
    indices[j] = key_index(keys[j]);
  }
  for (int64_t j = found; j < k; ++j) {
    values[j] = -std::numeric_limits<float>::infinity();
    indices[j] = -1;
  }
}

void check_table(const at::Tensor& S, int64_t M) {
  TORCH_CHECK(S.device().is_cpu() && S.scalar_type() == at::kFloat && S.dim() == 3 && S.is_contiguous(),
              "recjpq_cpu: S must be a contiguous float32 CPU tensor [B, M, K]");
  TORCH_CHECK(S.size(1) == M, "recjpq_cpu: S has M=", S.size(1), " splits but the codes have ", M);
}

void check_finite(const at::Tensor& S) {
  const uint32_t* bits = reinterpret_cast<const uint32_t*>(S.data_ptr<float>());
  uint32_t all_ones_exponent = 0;  // a float is nan or inf exactly when its exponent bits are all set
  for (int64_t i = 0, size = S.numel(); i < size; ++i)
    all_ones_exponent |= static_cast<uint32_t>((bits[i] & 0x7F800000u) == 0x7F800000u);
  TORCH_CHECK_VALUE(all_ones_exponent == 0, "S contains non-finite values (nan or inf)");
}

void check_blocked(const at::Tensor& blocked, int64_t n) {
  TORCH_CHECK(blocked.device().is_cpu() && blocked.dim() == 3 && blocked.size(2) == kBlock && blocked.is_contiguous(),
              "recjpq_cpu: blocked codes must be a contiguous CPU tensor [num_blocks, M, ", kBlock, "]");
  TORCH_CHECK(n >= 1 && blocked.size(0) == (n + kBlock - 1) / kBlock,
              "recjpq_cpu: blocked codes hold ", blocked.size(0), " blocks, which does not fit N=", n);
}

namespace {

constexpr int64_t kChunkBlocks = 32;  // 2048 items per chunk: M=8 uint8 codes take 16 KB (L1)
constexpr int64_t kBlocksPerScan = 4;  // 256 items per scorer call between threshold updates

// Units of work for run_units: chunks of kChunkBlocks blocks x query groups, numbered group-major so
// that each slot meets a query's items in ascending order. Queries are split into groups only when
// the catalogue has fewer chunks than threads; otherwise a unit serves every query from one load
// of its codes.
struct Grid {
  int64_t chunks, groups, num_blocks, batch;
  int threads;
  Grid(int64_t num_blocks_, int64_t batch_)
      : chunks((num_blocks_ + kChunkBlocks - 1) / kChunkBlocks), num_blocks(num_blocks_), batch(batch_),
        threads(work_threads()) {
    groups = chunks >= threads ? 1 : std::max<int64_t>(1, std::min<int64_t>(batch, threads));
  }
  int64_t units() const { return chunks * groups; }
};

// Runs body(block_begin, block_end, query_begin, query_end, slot) for every unit, caller-runs
// (waiting for helpers: pq_scores writes into the caller's output).
template <typename Body>
void for_each_unit(const Grid& grid, Body&& body) {
  auto unit_fn = [&](int64_t unit, int slot) {
    const int64_t chunk = unit % grid.chunks, group = unit / grid.chunks;
    body(chunk * kChunkBlocks, std::min(grid.num_blocks, (chunk + 1) * kChunkBlocks), grid.batch * group / grid.groups,
         grid.batch * (group + 1) / grid.groups, slot);
  };
  run_units(grid.units(), grid.threads, unit_fn);
}

// The private snapshot every cpu kernel reads: the codes copied once into the scan layout, with the
// smallest and largest code of that copy. The range is computed on the copy, not on the caller's
// tensor, so a thread writing to the codes meanwhile can make the snapshot stale, never unchecked.
std::tuple<at::Tensor, int64_t, int64_t> block_codes(const at::Tensor& codes) {
  TORCH_CHECK(codes.device().is_cpu() && codes.dim() == 2 && codes.size(0) >= 1 && codes.size(1) >= 1,
              "recjpq_cpu: codes must be a CPU tensor [N, M] with N, M >= 1");
  const at::Tensor rows = codes.contiguous();
  const int64_t n = rows.size(0), M = rows.size(1), num_blocks = (n + kBlock - 1) / kBlock;
  constexpr int64_t kGrain = 256;  // blocks per parallel unit
  const int64_t units = (num_blocks + kGrain - 1) / kGrain;
  std::vector<int64_t> lo(units), hi(units);
  // padding items get code 0 (a valid sub-id); the kernels never report them
  at::Tensor blocked = at::zeros({num_blocks, M, kBlock}, rows.options());
  dispatch_codes(rows.scalar_type(), [&](auto tag) {
    using CodeT = decltype(tag);
    const CodeT* src = rows.data_ptr<CodeT>();
    CodeT* dst = blocked.data_ptr<CodeT>();
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end; ++u) {
        CodeT mn = std::numeric_limits<CodeT>::max(), mx = std::numeric_limits<CodeT>::lowest();
        for (int64_t b = u * kGrain; b < std::min(num_blocks, (u + 1) * kGrain); ++b) {
          const int64_t width = std::min(kBlock, n - b * kBlock);
          CodeT* block = dst + b * M * kBlock;
          for (int64_t j = 0; j < width; ++j)
            for (int64_t m = 0; m < M; ++m) block[m * kBlock + j] = src[(b * kBlock + j) * M + m];
          // the range of what was copied, read back from the private block (still in L1)
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t j = 0; j < width; ++j) {
              mn = std::min(mn, block[m * kBlock + j]);
              mx = std::max(mx, block[m * kBlock + j]);
            }
          }
        }
        lo[u] = mn;
        hi[u] = mx;
      }
    });
  });
  return {blocked, *std::min_element(lo.begin(), lo.end()), *std::max_element(hi.begin(), hi.end())};
}

at::Tensor pq_scores(const at::Tensor& S, const at::Tensor& blocked, int64_t n, c10::string_view simd) {
  check_blocked(blocked, n);
  const int64_t M = blocked.size(1);
  check_table(S, M);
  const int64_t batch = S.size(0), K = S.size(2);
  at::Tensor out = at::empty({batch, n}, S.options());
  const Simd level = parse_simd(std::string(simd));
  dispatch_codes(blocked.scalar_type(), [&](auto tag) {
    using CodeT = decltype(tag);
    const auto score = score_blocks_fn<CodeT>(level);
    const CodeT* codes = blocked.data_ptr<CodeT>();
    const float* table = S.data_ptr<float>();
    float* scores = out.data_ptr<float>();
    const Grid grid(blocked.size(0), batch);
    std::vector<float> tails(grid.threads * kChunkBlocks * kBlock);  // per slot
    for_each_unit(grid, [&](int64_t c, int64_t blk1, int64_t q0, int64_t q1, int slot) {
      float* tail = tails.data() + slot * kChunkBlocks * kBlock;
      const int64_t nb = blk1 - c, first = c * kBlock;
      const int64_t width = std::min(nb * kBlock, n - first);
      for (int64_t q = q0; q < q1; ++q) {
        float* row = scores + q * n + first;
        const bool whole = width == nb * kBlock;  // write in place unless the chunk runs past N
        score(codes + c * M * kBlock, nb, M, table + q * M * K, K, 0.0f, whole ? row : tail, nullptr);
        if (!whole) std::memcpy(row, tail, width * sizeof(float));
      }
    });
  });
  return out;
}

// One query's S quantised to bytes on a common step (q >= floor((S - min_m) / step)), with what it
// takes to turn a float threshold into a 16-bit one that every item able to reach it passes: in
// exact arithmetic sum_m S_m < sum_m (min_m + (q_m + 1) * step) = base + (Q + M) * step, and the
// item's float sum differs from that by less than slack. (Q + 2M) here until 2026-11-26: at
// M = 32 that let through 1.7x as many items to rescore (k = 100, N = 3,417, random S).
class ByteTable {
 public:
  ByteTable(const float* S, int64_t M, int64_t K, ByteTableFns simd) : bytes_(M * 256, 0), M_(M) {
    std::vector<float> lo(M), hi(M);
    if (simd.ranges) {
      simd.ranges(S, M, K, lo.data(), hi.data());
    } else {
      for (int64_t m = 0; m < M; ++m) {
        const auto [mn, mx] = std::minmax_element(S + m * K, S + (m + 1) * K);
        lo[m] = *mn;
        hi[m] = *mx;
      }
    }
    double widest = 0.0, largest = 0.0;
    base_ = 0.0;
    for (int64_t m = 0; m < M; ++m) {
      base_ += lo[m];
      widest = std::max(widest, static_cast<double>(hi[m]) - lo[m]);
      largest = std::max({largest, std::fabs(static_cast<double>(lo[m])), std::fabs(static_cast<double>(hi[m]))});
    }
    step_ = widest > 0.0 ? widest / 255.0 : 1.0;
    slack_ = static_cast<double>(M * M) * largest * std::ldexp(1.0, -22);
    // q = round((S - min_m) / step): its error (< 1e-4 steps in float) is far below the 0.5 that
    // rounding adds, so q >= floor((S - min_m) / step) and the bound above still holds. A multiply
    // by the inverse instead of a division and a libm floor per entry; in double where the float
    // inverse would overflow (a subnormal step: 0 * inf is nan).
    const double inverse = 1.0 / step_;
    if (simd.quantize && inverse <= std::numeric_limits<float>::max()) {
      simd.quantize(S, M, K, lo.data(), static_cast<float>(inverse), bytes_.data());
      return;
    }
    for (int64_t m = 0; m < M; ++m) {
      for (int64_t c = 0; c < K; ++c) {
        const double rounded = (static_cast<double>(S[m * K + c]) - lo[m]) * inverse + 0.5;
        bytes_[m * 256 + c] = rounded >= 255.0 ? 255 : static_cast<uint8_t>(rounded);
      }
    }
  }

  const uint8_t* data() const { return bytes_.data(); }

  uint16_t threshold(float score) const {
    if (!(score > -std::numeric_limits<float>::infinity())) return 0;
    const double q = (score - slack_ - base_) / step_ - static_cast<double>(M_);
    return q <= 0.0 ? 0 : q >= 65535.0 ? 65535 : static_cast<uint16_t>(std::floor(q));
  }

 private:
  std::vector<uint8_t> bytes_;
  int64_t M_;
  double base_, step_, slack_;
};

// One pq_topk call's scan: everything a unit touches, owned here (tensors by reference count), because
// a helper revoked for being slow may still finish its unit after pq_topk has returned
// (run_units_revocable). Slots [0, threads] each keep an AscendingTopK per query.
template <typename CodeT>
struct TopkScan {
  at::Tensor S, blocked;  // held so that their memory outlives any late helper
  int64_t n, k, M, K, batch;
  Grid grid;
  ExcludeLists excluded;
  ScoreBlocksFn<CodeT> score;
  FilterBlocksFn filter;
  ByteTableFns byte_fns;
  // built on a query's first unit, next to its scan, which reads the same S rows
  std::vector<std::optional<ByteTable>> bytes;
  std::unique_ptr<std::once_flag[]> bytes_built;
  std::vector<AscendingTopK> found;  // [slot, query]
  std::vector<char> warmed;  // [slot, query]: the slot has scanned a chunk for the query
  struct FilterThreshold {
    float score;     // a top-k threshold
    uint16_t bytes;  // and ByteTable::threshold of it
  };
  std::vector<FilterThreshold> filter_thresholds;  // [slot, query]: the last one the slot filtered with
  std::vector<float> slot_scores;
  std::vector<uint64_t> slot_masks;

  TopkScan(const at::Tensor& S_, const at::Tensor& blocked_, int64_t n_, int64_t k_,
           const c10::optional<at::Tensor>& exclude, Simd level)
      : S(S_), blocked(blocked_), n(n_), k(k_), M(blocked_.size(1)), K(S_.size(2)), batch(S_.size(0)),
        grid(blocked_.size(0), S_.size(0)), excluded(exclude, S_.size(0), n_), score(score_blocks_fn<CodeT>(level)),
        // uint8 codes on AVX-512 VBMI: filter on byte tables, rescore the few survivors exactly
        filter(std::is_same<CodeT, uint8_t>::value && K <= 256 && M * 255 <= 65535 ? filter_blocks_fn(level) : nullptr),
        byte_fns(filter ? byte_table_fns(level) : ByteTableFns{nullptr, nullptr}),
        found((grid.threads + 1) * batch, AscendingTopK(k_)),
        warmed((grid.threads + 1) * batch, 0),
        filter_thresholds((grid.threads + 1) * batch, FilterThreshold{std::numeric_limits<float>::quiet_NaN(), 0}),
        slot_scores((grid.threads + 1) * kChunkBlocks * kBlock),
        slot_masks((grid.threads + 1) * kChunkBlocks) {
    if (filter) {
      bytes.resize(batch);
      bytes_built.reset(new std::once_flag[batch]);
    }
  }

  void unit(int64_t u, int slot) {
    // one query group (every call with at least `threads` chunks): no divisions per unit
    const bool one_group = grid.groups == 1;
    const int64_t c = (one_group ? u : u % grid.chunks) * kChunkBlocks, group = one_group ? 0 : u / grid.chunks;
    const int64_t nb = std::min(grid.num_blocks, c + kChunkBlocks) - c;
    const int64_t q0 = one_group ? 0 : batch * group / grid.groups, q1 = one_group ? batch : batch * (group + 1) / grid.groups;
    for (int64_t q = q0; q < q1; ++q) {
      AscendingTopK& best = found[slot * batch + q];
      // while the threshold is -inf every item passes: one block at a time until it is finite
      int64_t b = 0;
      for (; b < nb && !best.settle(); ++b) scan_blocks(slot, q, c, b, b + 1);
      // then, in the slot's first chunk of the query, a few blocks per call, so that the threshold
      // the scorer filters with follows the young top-k; later chunks in one call
      char& warm = warmed[slot * batch + q];
      const int64_t step = warm ? nb : kBlocksPerScan;
      for (; b < nb; b += step) scan_blocks(slot, q, c, b, std::min(nb, b + step));
      warm = 1;
    }
  }

  // Scores (or filters) blocks [b0, b1) of the chunk at block c for query q, and pushes the items
  // that pass the query's threshold into its slot's top-k.
  void scan_blocks(int slot, int64_t q, int64_t c, int64_t b0, int64_t b1) {
    AscendingTopK& best = found[slot * batch + q];
    float* scores = slot_scores.data() + slot * kChunkBlocks * kBlock;
    uint64_t* masks = slot_masks.data() + slot * kChunkBlocks;
    const CodeT* blocks = blocked.data_ptr<CodeT>() + (c + b0) * M * kBlock;
    const float* Sq = S.data_ptr<float>() + q * M * K;
    if (filter) {
      std::call_once(bytes_built[q], [&] { bytes[q].emplace(Sq, M, K, byte_fns); });
      FilterThreshold& known = filter_thresholds[slot * batch + q];  // the division, once per new threshold
      if (known.score != best.threshold()) known = {best.threshold(), bytes[q]->threshold(best.threshold())};
      if (!filter(reinterpret_cast<const uint8_t*>(blocks), b1 - b0, M, bytes[q]->data(), known.bytes, masks)) return;
    } else {
      score(blocks, b1 - b0, M, Sq, K, best.threshold(), scores, masks);
    }
    for (int64_t b = 0; b < b1 - b0; ++b) {
      const int64_t first = (c + b0 + b) * kBlock;  // the block's first item
      int passed[kBlock], count = 0;
      for (uint64_t mask = masks[b]; mask; mask &= mask - 1) {
        const int j = __builtin_ctzll(mask);
        if (first + j >= n) break;
        if (!excluded.contains(q, first + j)) passed[count++] = j;
      }
      if (!filter) {
        for (int i = 0; i < count; ++i) best.push(scores[b * kBlock + passed[i]], first + passed[i]);
        continue;
      }
      const CodeT* items[kBlock];
      for (int i = 0; i < count; ++i) items[i] = blocks + b * M * kBlock + passed[i];
      float exact[kBlock];
      exact_scores(items, count, Sq, M, K, exact);
      for (int i = 0; i < count; ++i) best.push(exact[i], first + passed[i]);
    }
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> pq_topk(const at::Tensor& S, const at::Tensor& blocked, int64_t n, int64_t k,
                                           const c10::optional<at::Tensor>& exclude, c10::string_view simd) {
  check_blocked(blocked, n);
  check_table(S, blocked.size(1));
  check_finite(S);
  TORCH_CHECK(k >= 1 && k <= n, "recjpq_cpu: k must be in [1, N=", n, "], got ", k);
  const int64_t batch = S.size(0);
  const Simd level = parse_simd(std::string(simd));
  at::Tensor values = at::empty({batch, k}, S.options());
  at::Tensor indices = at::empty({batch, k}, S.options().dtype(at::kLong));
  float* vals = values.data_ptr<float>();
  int64_t* ids = indices.data_ptr<int64_t>();
  dispatch_codes(blocked.scalar_type(), [&](auto tag) {
    using Scan = TopkScan<decltype(tag)>;
    auto scan = std::make_shared<Scan>(S, blocked, n, k, exclude, level);
    const int threads = scan->grid.threads;
    const std::vector<char> counted = run_units_revocable(
        scan->grid.units(), threads, [](void* ctx, int64_t u, int slot) { static_cast<Scan*>(ctx)->unit(u, slot); },
        scan);
    // per query, the candidates of every counted slot: packed keys are a total order, so the answer
    // does not depend on which thread scanned which chunk
    auto merge = [&](int64_t q, int) {
      std::vector<int64_t> keys;
      for (int slot = 0; slot <= threads; ++slot) {
        if (!counted[slot]) continue;
        const auto& slot_keys = scan->found[slot * batch + q].keys();
        keys.insert(keys.end(), slot_keys.begin(), slot_keys.end());
      }
      write_topk(keys, k, vals + q * k, ids + q * k);
    };
    run_units(batch, threads, merge);
  });
  return {values, indices};
}

namespace {

bool simd_supported_op(c10::string_view name) {
  for (Simd level : {Simd::kScalar, Simd::kAvx2, Simd::kAvx512}) {
    if (name == simd_name(level)) return simd_supported(level);
  }
  TORCH_CHECK(false, "recjpq_cpu: SIMD path must be scalar, avx2 or avx512, got '", std::string(name), "'");
}

std::string simd_resolved_op(c10::string_view name) { return simd_name(parse_simd(std::string(name))); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(recjpq_cpu, m) {
  m.def("block_codes(Tensor codes) -> (Tensor, int, int)", &block_codes);
  m.def("pq_scores(Tensor S, Tensor blocked, int n, str simd) -> Tensor", &pq_scores);
  m.def("pq_topk(Tensor S, Tensor blocked, int n, int k, Tensor? exclude, str simd) -> (Tensor, Tensor)", &pq_topk);
  m.def("simd_supported(str level) -> bool", &simd_supported_op);
  m.def("simd_resolved(str level) -> str", &simd_resolved_op);
}

}  // namespace recjpq_cpu
