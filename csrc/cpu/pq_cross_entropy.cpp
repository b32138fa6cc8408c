// Fused PQ cross-entropy on CPU: the log-sum-exp of every item's score and its gradient, item
// tile by item tile, so no B x N logits ever exist.
//
//   forward:  lse[b] = log sum_i exp(scale * score[b, i]),   score[b, i] = sum_m S[b, m, codes[i, m]]
//   backward: dS[b, m, k] = grad[b] * scale * sum over items i with codes[i, m] == k of exp(scale * score[b, i] - lse[b])
//
// Codes come in the scan layout of pq_common.h ([num_blocks, M, kBlock], built once per codes
// tensor by block_codes), so float32 tiles are scored by the shared SIMD block scorers. Work is
// split into (block of rows) x (range of items) units; a unit streams its codes one tile at a time
// and every row of the block reuses the tile from L1. Partial results of the item ranges (running
// max and sum, or gradient sums) are kept in double and merged after the parallel loop.
#include "pq_common.h"

#include <ATen/Parallel.h>

namespace recjpq_cpu {
namespace {

constexpr int64_t kTileBlocks = 16;  // blocks scored at once: 1,024 items whose codes and scores fit in L1
constexpr int64_t kItemTile = kTileBlocks * kBlock;
constexpr int64_t kRowBlock = 8;     // rows that share one pass over the codes

// exp for float as a polynomial the compiler can vectorise (std::exp is a libm call per element).
// Cody-Waite reduction to r in [-ln2/2, ln2/2], then the Cephes expf polynomial. Inputs below -87
// give ~1e-38 instead of smaller values: negligible next to the row maximum's exp(0) = 1.
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // round x / ln2 to an integer n by adding 1.5 * 2^23 (no SSE4.1 rounding instruction needed)
  constexpr float kRound = 12582912.0f;
  const float shifted = x * 1.44269504088896341f + kRound;
  const float n = shifted - kRound;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits, n_bits, round_bits;
  std::memcpy(&bits, &p, sizeof(bits));
  std::memcpy(&n_bits, &shifted, sizeof(n_bits));
  std::memcpy(&round_bits, &kRound, sizeof(round_bits));
  bits += (n_bits - round_bits) * (1 << 23);  // the low mantissa bits of `shifted` hold n
  std::memcpy(&p, &bits, sizeof(bits));
  return p;
}

inline double exp_approx(double x) { return std::exp(x); }  // float64 serves gradcheck, not speed

// Scores of the items in `num_blocks` blocks for one row, times scale, splits added in order
// m = 0..M-1 as in the reference backend. float32 takes the SIMD scorer; float64 (gradcheck) a loop.
template <typename CodeT>
void tile_scores(const float* S_row, const CodeT* blocks, int64_t num_blocks, int64_t M, int64_t K, float scale,
                 ScoreBlocksFn<CodeT> score, float* out) {
  score(blocks, num_blocks, M, S_row, K, -std::numeric_limits<float>::infinity(), out, nullptr);
  for (int64_t i = 0; i < num_blocks * kBlock; ++i) out[i] *= scale;
}

template <typename CodeT>
void tile_scores(const double* S_row, const CodeT* blocks, int64_t num_blocks, int64_t M, int64_t K, double scale,
                 ScoreBlocksFn<CodeT>, double* out) {
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    const CodeT* codes = blocks + blk * M * kBlock;
    double* acc = out + blk * kBlock;
    for (int64_t j = 0; j < kBlock; ++j) acc[j] = S_row[codes[j]];
    for (int64_t m = 1; m < M; ++m)
      for (int64_t j = 0; j < kBlock; ++j) acc[j] += S_row[m * K + codes[m * kBlock + j]];
    for (int64_t j = 0; j < kBlock; ++j) acc[j] *= scale;
  }
}

struct WorkSplit {
  int64_t row_blocks, item_ranges, range_len;
};

// Enough units to keep every thread busy: item ranges only when rows alone cannot.
WorkSplit split_work(int64_t batch, int64_t n) {
  const int64_t row_blocks = (batch + kRowBlock - 1) / kRowBlock;
  const int64_t threads = at::get_num_threads();
  int64_t ranges = row_blocks >= threads ? 1 : (threads + row_blocks - 1) / row_blocks;
  ranges = std::max<int64_t>(1, std::min(ranges, (n + kItemTile - 1) / kItemTile));
  const int64_t tiles_per_range = ((n + kItemTile - 1) / kItemTile + ranges - 1) / ranges;
  return {row_blocks, ranges, tiles_per_range * kItemTile};
}

// One (rows, item range) work unit: calls visit(b, z, width) for every row b of the block and every
// tile of the range, with z holding scale * the scores of the tile's `width` items.
template <typename scalar_t, typename CodeT, typename Visit>
void for_each_tile(const scalar_t* S, const CodeT* blocks, int64_t batch, int64_t n, int64_t M, int64_t K,
                   double scale, ScoreBlocksFn<CodeT> score, const WorkSplit& w, int64_t unit, scalar_t* z,
                   Visit&& visit) {
  const int64_t rb = unit / w.item_ranges, range = unit % w.item_ranges;
  const int64_t row0 = rb * kRowBlock, row1 = std::min(batch, row0 + kRowBlock);
  const int64_t lo = range * w.range_len, hi = std::min(n, lo + w.range_len);
  for (int64_t start = lo; start < hi; start += kItemTile) {
    const int64_t width = std::min(kItemTile, hi - start);
    const int64_t num_blocks = (width + kBlock - 1) / kBlock;
    const CodeT* tile = blocks + (start / kBlock) * M * kBlock;
    for (int64_t b = row0; b < row1; ++b) {
      if (!visit.wants(b)) continue;
      tile_scores(S + b * M * K, tile, num_blocks, M, K, static_cast<scalar_t>(scale), score, z);
      visit(b, range, tile, z, width);
    }
  }
}

template <typename scalar_t, typename CodeT>
void logsumexp_kernel(const scalar_t* S, const CodeT* blocks, int64_t batch, int64_t n, int64_t M, int64_t K,
                      double scale, ScoreBlocksFn<CodeT> score, scalar_t* lse) {
  const WorkSplit w = split_work(batch, n);
  // running (max, sum of exp(z - max)) per (item range, row)
  std::vector<double> run_max(w.item_ranges * batch, -std::numeric_limits<double>::infinity());
  std::vector<double> run_sum(w.item_ranges * batch, 0.0);
  struct {
    std::vector<double>& run_max;
    std::vector<double>& run_sum;
    int64_t batch;
    bool wants(int64_t) const { return true; }
    void operator()(int64_t b, int64_t range, const CodeT*, const scalar_t* z, int64_t width) {
      scalar_t tile_max = z[0];
      for (int64_t i = 1; i < width; ++i) tile_max = std::max(tile_max, z[i]);
      double& mx = run_max[range * batch + b];
      double& sum = run_sum[range * batch + b];
      if (tile_max > mx) {
        sum *= std::exp(mx - static_cast<double>(tile_max));
        mx = tile_max;
      }
      const scalar_t shift = static_cast<scalar_t>(mx);
      double tile_sum = 0.0;
#pragma omp simd reduction(+ : tile_sum)
      for (int64_t i = 0; i < width; ++i) tile_sum += exp_approx(z[i] - shift);
      sum += tile_sum;
    }
  } visit{run_max, run_sum, batch};
  at::parallel_for(0, w.row_blocks * w.item_ranges, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> z(kItemTile);
    for (int64_t unit = begin; unit < end; ++unit)
      for_each_tile(S, blocks, batch, n, M, K, scale, score, w, unit, z.data(), visit);
  });
  for (int64_t b = 0; b < batch; ++b) {
    double mx = -std::numeric_limits<double>::infinity();
    for (int64_t r = 0; r < w.item_ranges; ++r) mx = std::max(mx, run_max[r * batch + b]);
    double sum = 0.0;
    for (int64_t r = 0; r < w.item_ranges; ++r) {
      if (run_sum[r * batch + b] > 0.0) sum += run_sum[r * batch + b] * std::exp(run_max[r * batch + b] - mx);
    }
    lse[b] = static_cast<scalar_t>(mx + std::log(sum));
  }
}

template <typename scalar_t, typename CodeT>
void logsumexp_backward_kernel(const scalar_t* S, const CodeT* blocks, const scalar_t* lse, const scalar_t* grad,
                               int64_t batch, int64_t n, int64_t M, int64_t K, double scale,
                               ScoreBlocksFn<CodeT> score, scalar_t* dS) {
  const WorkSplit w = split_work(batch, n);
  const int64_t table = M * K;
  // probability sums per (item range, row, split, sub-id)
  std::vector<double> acc(w.item_ranges * batch * table, 0.0);
  struct {
    std::vector<double>& acc;
    const scalar_t* lse;
    const scalar_t* grad;
    int64_t batch, M, K;
    bool wants(int64_t b) const { return grad[b] != 0; }  // rows without gradient add nothing
    void operator()(int64_t b, int64_t range, const CodeT* tile, scalar_t* z, int64_t width) {
      const scalar_t shift = lse[b];
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) z[i] = exp_approx(z[i] - shift);
      double* row_acc = acc.data() + (range * batch + b) * M * K;
      for (int64_t start = 0; start < width; start += kBlock) {
        const CodeT* block = tile + (start / kBlock) * M * kBlock;
        const int64_t valid = std::min(kBlock, width - start);
        for (int64_t m = 0; m < M; ++m) {
          double* split_acc = row_acc + m * K;
          const CodeT* codes = block + m * kBlock;
          for (int64_t j = 0; j < valid; ++j) split_acc[codes[j]] += z[start + j];
        }
      }
    }
  } visit{acc, lse, grad, batch, M, K};
  at::parallel_for(0, w.row_blocks * w.item_ranges, 1, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> z(kItemTile);
    for (int64_t unit = begin; unit < end; ++unit)
      for_each_tile(S, blocks, batch, n, M, K, scale, score, w, unit, z.data(), visit);
  });
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const double weight = static_cast<double>(grad[b]) * scale;
      for (int64_t j = 0; j < table; ++j) {
        double total = 0.0;
        for (int64_t r = 0; r < w.item_ranges; ++r) total += acc[(r * batch + b) * table + j];
        dS[b * table + j] = static_cast<scalar_t>(weight * total);
      }
    }
  });
}

void check_inputs(const at::Tensor& S, const at::Tensor& blocked, int64_t n) {
  TORCH_CHECK(S.device().is_cpu() && blocked.device().is_cpu(), "pq_cross_entropy (cpu): tensors must be on cpu");
  TORCH_CHECK(S.dim() == 3 && S.is_contiguous() && (S.scalar_type() == at::kFloat || S.scalar_type() == at::kDouble),
              "pq_cross_entropy (cpu): S must be a contiguous float32 or float64 tensor [B, M, K]");
  TORCH_CHECK(blocked.dim() == 3 && blocked.is_contiguous() && blocked.size(1) == S.size(1) &&
                  blocked.size(2) == kBlock && n >= 1 && blocked.size(0) == (n + kBlock - 1) / kBlock,
              "pq_cross_entropy (cpu): codes must be in the block_codes layout [ceil(N / 64), M, 64] of S's M");
}

at::Tensor forward(const at::Tensor& S, const at::Tensor& blocked, int64_t n, double scale, c10::string_view simd) {
  check_inputs(S, blocked, n);
  const Simd level = parse_simd(std::string(simd));
  auto lse = at::empty({S.size(0)}, S.options());
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "pq_cross_entropy_forward", [&] {
    dispatch_codes(blocked.scalar_type(), [&](auto tag) {
      using CodeT = decltype(tag);
      logsumexp_kernel<scalar_t>(S.data_ptr<scalar_t>(), blocked.data_ptr<CodeT>(), S.size(0), n, S.size(1),
                                 S.size(2), scale, score_blocks_fn<CodeT>(level), lse.data_ptr<scalar_t>());
    });
  });
  return lse;
}

at::Tensor backward(const at::Tensor& S, const at::Tensor& blocked, int64_t n, const at::Tensor& lse,
                    const at::Tensor& grad_lse, double scale, c10::string_view simd) {
  check_inputs(S, blocked, n);
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == S.size(0) && lse.scalar_type() == S.scalar_type() && lse.is_contiguous(),
              "pq_cross_entropy (cpu): lse must be contiguous [B] of S's dtype");
  TORCH_CHECK(grad_lse.sizes() == lse.sizes() && grad_lse.scalar_type() == S.scalar_type() && grad_lse.is_contiguous(),
              "pq_cross_entropy (cpu): grad_lse must be contiguous [B] of S's dtype");
  const Simd level = parse_simd(std::string(simd));
  auto dS = at::empty_like(S);
  AT_DISPATCH_FLOATING_TYPES(S.scalar_type(), "pq_cross_entropy_backward", [&] {
    dispatch_codes(blocked.scalar_type(), [&](auto tag) {
      using CodeT = decltype(tag);
      logsumexp_backward_kernel<scalar_t>(S.data_ptr<scalar_t>(), blocked.data_ptr<CodeT>(),
                                          lse.data_ptr<scalar_t>(), grad_lse.data_ptr<scalar_t>(), S.size(0), n,
                                          S.size(1), S.size(2), scale, score_blocks_fn<CodeT>(level),
                                          dS.data_ptr<scalar_t>());
    });
  });
  return dS;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(recjpq_cpu, m) {
  m.def("pq_cross_entropy_forward(Tensor S, Tensor blocked, int n, float scale, str simd) -> Tensor", &forward);
  m.def("pq_cross_entropy_backward(Tensor S, Tensor blocked, int n, Tensor lse, Tensor grad_lse, float scale, "
        "str simd) -> Tensor", &backward);
}

}  // namespace recjpq_cpu
