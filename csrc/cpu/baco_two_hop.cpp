// BACO's item-code refinement (recjpq/codes/baco.py, _refine_split) on CPU.
//
// An item's affinity to code c goes through its users: S[i, c] = sum over users u of i of w_ui *
// hist[u, c], hist[u, c] being the grid weights v_uj of u's items j with code c. The torch path
// multiplies the items' CSR rows by a dense users x K histogram: K multiply-adds and a K-wide row of
// memory per edge (at 1M items / 10M edges / K = 256, a 410 MB histogram read at random). Here each
// item walks its users' edge lists instead and adds every (code, weight) pair into one K-wide row
// that stays in L1: work in two-hop paths (mean user degree per edge), not in K per edge.
//
// With integer edge weights and the dyadic grid values of baco.py every sum is exact, so the order
// of the sums does not matter: the codes equal the torch reference's, for any thread count (each
// item's row is also summed by one thread in a fixed order). Ranges are checked on the data read.
#include <atomic>
#include <type_traits>
#include <vector>

#include "pq_common.h"
#include "work_sharing.h"

namespace recjpq_cpu {
namespace {

constexpr int64_t kRowsPerUnit = 64;
constexpr int64_t kPrefetchAhead = 8;  // users whose edge lists are requested before they are summed

void check_vector(const at::Tensor& t, at::ScalarType type, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == type && t.dim() == 1 && t.is_contiguous(), "recjpq_cpu: ",
              name, " must be a contiguous 1-D ", c10::toString(type), " CPU tensor");
}

// The users' edge lists: per user edge p = (u, j), the code of item j and its grid weight v_uj in
// user CSR order (indptr), and per user the weight all its edges share (uniform[u] >= 0), or -1 when
// they differ and values holds them. Where a user's edges share one weight (every user of an
// unweighted log) a sum reads one code per two-hop path and nothing else.
template <typename Code>
struct UserLists {
  const int64_t* indptr;
  const Code* codes;
  const double* values;
  const double* uniform;
  int64_t num_users, edges, K;
  bool check_codes;  // false when no Code value can reach K (uint8 codes, K >= 256)

  // row[c] += w * hist[u, c] over edges [begin, end) of one user, whose edges share the weight
  // v (v >= 0) or not (v < 0); false if a code is out of range (the row is then incomplete). Each
  // code is read once, checked and used.
  bool add(int64_t begin, int64_t end, double w, double v, double* row) const {
    if (check_codes) {
      return v >= 0.0 ? walk<true, true>(begin, end, w, v, row) : walk<true, false>(begin, end, w, v, row);
    }
    return v >= 0.0 ? walk<false, true>(begin, end, w, v, row) : walk<false, false>(begin, end, w, v, row);
  }
  template <bool kCheck, bool kShared>
  bool walk(int64_t begin, int64_t end, double w, double v, double* row) const {
    const double wv = w * v;
    for (int64_t p = begin; p < end; ++p) {
      const uint64_t c = static_cast<uint64_t>(codes[p]);
      if (kCheck && c >= static_cast<uint64_t>(K)) return false;
      row[c] += kShared ? wv : w * values[p];
    }
    return true;
  }
  // The code of edge p, clamped into [0, K): for reads after add() has checked the codes.
  uint64_t code(int64_t p) const {
    return std::min(static_cast<uint64_t>(codes[p]), static_cast<uint64_t>(K - 1));
  }
};

template <typename Code>
UserLists<Code> user_lists(const at::Tensor& user_indptr, const at::Tensor& user_value, const at::Tensor& edge_codes,
                           const at::Tensor& edge_values, int64_t K) {
  check_vector(user_indptr, at::kLong, "user_indptr");
  check_vector(user_value, at::kDouble, "user_value");
  check_vector(edge_values, at::kDouble, "edge_values");
  const int64_t num_users = user_indptr.numel() - 1, edges = edge_codes.numel();
  TORCH_CHECK(num_users >= 0 && user_value.numel() == num_users && edge_values.numel() == edges,
              "recjpq_cpu: user_indptr [U + 1], user_value [U], edge_codes and edge_values [E] disagree in size");
  const bool check_codes = !(std::is_same<Code, uint8_t>::value && K >= 256);
  return {user_indptr.data_ptr<int64_t>(), edge_codes.data_ptr<Code>(), edge_values.data_ptr<double>(),
          user_value.data_ptr<double>(), num_users, edges, K, check_codes};
}

// Per item in `items`: the code with the highest balanced-modularity score
//   score[c] = S[i, c] - gamma s_i (V[c] - s_i [c == own])   (S without the item's own term)
// (first maximum: ties go to the lower code) and its gain over the item's own code. The item side
// comes per item edge e = (i, u) in item CSR order: its weight w_ui, u's edge list [user_begin[e],
// user_end[e]) and u's shared weight (negative if u has none), so that the only read at random is
// the user's codes, requested a few edges ahead. Users with many edges (dense_slot[e] >= 0) come as
// rows of dense_rows [R, K], their code histograms: K vectorised multiply-adds instead of a walk
// of more than K/2 scattered ones.
template <typename Code>
void best_codes(const UserLists<Code>& users, const at::Tensor& item_indptr, const at::Tensor& item_weights,
                const at::Tensor& user_begin, const at::Tensor& user_end, const at::Tensor& user_shared,
                const at::Tensor& dense_slot, const at::Tensor& dense_rows, const at::Tensor& items,
                const at::Tensor& codes, const at::Tensor& self_weight, const at::Tensor& strength,
                const at::Tensor& volume, double gamma, at::Tensor& best, at::Tensor& gain) {
  const int64_t num_items = codes.numel(), item_edges = item_weights.numel(), K = users.K, n = items.numel();
  const int64_t* iptr = item_indptr.data_ptr<int64_t>();
  const double* iw = item_weights.data_ptr<double>();
  const int64_t* ubegin = user_begin.data_ptr<int64_t>();
  const int64_t* uend = user_end.data_ptr<int64_t>();
  const double* shared = user_shared.data_ptr<double>();
  const int32_t* slots = dense_slot.data_ptr<int32_t>();
  const double* dense = dense_rows.data_ptr<double>();
  const int64_t num_dense = dense_rows.size(0);
  const int64_t* item_ids = items.data_ptr<int64_t>();
  const int64_t* code = codes.data_ptr<int64_t>();
  const double* self_w = self_weight.data_ptr<double>();
  const double* s = strength.data_ptr<double>();
  const double* V = volume.data_ptr<double>();
  int64_t* best_out = best.data_ptr<int64_t>();
  double* gain_out = gain.data_ptr<double>();
  const int threads = work_threads();
  std::vector<double> scratch(static_cast<size_t>(threads) * 2 * K, 0.0);  // per slot: the row, then its scores
  std::atomic<bool> bad{false};
  auto unit_fn = [&](int64_t unit, int slot) {
    double* row = scratch.data() + static_cast<size_t>(slot) * 2 * K;  // all zero between items
    double* score = row + K;
    const int64_t stop = std::min(n, (unit + 1) * kRowsPerUnit);
    for (int64_t t = unit * kRowsPerUnit; t < stop; ++t) {
      const int64_t i = item_ids[t];
      best_out[t] = 0, gain_out[t] = 0.0;
      if (i < 0 || i >= num_items) {
        bad.store(true, std::memory_order_relaxed);
        continue;
      }
      const int64_t begin = iptr[i], end = iptr[i + 1], own = code[i];
      if (begin < 0 || begin > end || end > item_edges || own < 0 || own >= K) {
        bad.store(true, std::memory_order_relaxed);
        continue;
      }
      if (begin == end && s[i] == 0.0 && self_w[i] == 0.0) continue;  // every score is 0: code 0, gain 0
      bool ok = true;
      for (int64_t e = begin; e < std::min(end, begin + kPrefetchAhead); ++e)
        __builtin_prefetch(users.codes + ubegin[e]);
      for (int64_t e = begin; e < end; ++e) {
        if (e + kPrefetchAhead < end) __builtin_prefetch(users.codes + ubegin[e + kPrefetchAhead]);
        const int64_t slot = slots[e];
        if (slot >= 0) {  // a heavy user: its histogram row, K-wide
          if (slot >= num_dense) {
            ok = false;
            continue;
          }
          const double* hist = dense + slot * K;
          const double w = iw[e];
#pragma omp simd
          for (int64_t c = 0; c < K; ++c) row[c] += w * hist[c];
          continue;
        }
        const int64_t b = ubegin[e], f = uend[e];
        ok = ok && b >= 0 && b <= f && f <= users.edges && users.add(b, f, iw[e], shared[e], row);
      }
      row[own] -= self_w[i];
      const double g = gamma * s[i];
      double top_score = -std::numeric_limits<double>::infinity();
#pragma omp simd
      for (int64_t c = 0; c < K; ++c) {
        score[c] = row[c] - g * V[c];
        row[c] = 0.0;
      }
      score[own] += g * s[i];  // an item does not compete with itself
#pragma omp simd reduction(max : top_score)
      for (int64_t c = 0; c < K; ++c) top_score = std::max(top_score, score[c]);
      if (!ok) {
        bad.store(true, std::memory_order_relaxed);
        continue;
      }
      int64_t top = 0;
      while (top < K - 1 && !(score[top] >= top_score)) ++top;  // the first maximum: ties go to the lower code
      best_out[t] = top;
      gain_out[t] = score[top] - score[own];
    }
  };
  run_units((n + kRowsPerUnit - 1) / kRowsPerUnit, threads, unit_fn);
  TORCH_CHECK(!bad.load(), "recjpq_cpu: baco_best_codes read an item or code id out of range, or a bad indptr");
}

std::tuple<at::Tensor, at::Tensor> baco_best_codes(const at::Tensor& item_indptr, const at::Tensor& item_weights,
                                                   const at::Tensor& user_begin, const at::Tensor& user_end,
                                                   const at::Tensor& user_shared, const at::Tensor& dense_slot,
                                                   const at::Tensor& dense_rows, const at::Tensor& user_indptr,
                                                   const at::Tensor& user_value, const at::Tensor& edge_codes,
                                                   const at::Tensor& edge_values, const at::Tensor& items,
                                                   const at::Tensor& codes, const at::Tensor& self_weight,
                                                   const at::Tensor& strength, const at::Tensor& volume,
                                                   double gamma) {
  check_vector(item_indptr, at::kLong, "item_indptr");
  check_vector(item_weights, at::kDouble, "item_weights");
  check_vector(user_begin, at::kLong, "user_begin");
  check_vector(user_end, at::kLong, "user_end");
  check_vector(user_shared, at::kDouble, "user_shared");
  check_vector(dense_slot, at::kInt, "dense_slot");
  TORCH_CHECK(dense_rows.device().is_cpu() && dense_rows.scalar_type() == at::kDouble && dense_rows.dim() == 2 &&
                  dense_rows.is_contiguous() && dense_rows.size(1) == volume.numel(),
              "recjpq_cpu: dense_rows must be a contiguous float64 CPU tensor [R, K]");
  check_vector(items, at::kLong, "items");
  check_vector(codes, at::kLong, "codes");
  check_vector(self_weight, at::kDouble, "self_weight");
  check_vector(strength, at::kDouble, "strength");
  check_vector(volume, at::kDouble, "volume");
  const int64_t num_items = codes.numel(), item_edges = item_weights.numel(), K = volume.numel();
  TORCH_CHECK(K >= 1 && item_indptr.numel() == num_items + 1 && user_begin.numel() == item_edges &&
                  user_end.numel() == item_edges && user_shared.numel() == item_edges &&
                  dense_slot.numel() == item_edges &&
                  self_weight.numel() == num_items && strength.numel() == num_items,
              "recjpq_cpu: baco_best_codes got inconsistent sizes");
  at::Tensor best = at::empty({items.numel()}, items.options());
  at::Tensor gain = at::empty({items.numel()}, volume.options());
  if (edge_codes.scalar_type() == at::kByte) {
    check_vector(edge_codes, at::kByte, "edge_codes");
    best_codes(user_lists<uint8_t>(user_indptr, user_value, edge_codes, edge_values, K), item_indptr, item_weights,
               user_begin, user_end, user_shared, dense_slot, dense_rows, items, codes, self_weight, strength, volume,
               gamma, best, gain);
  } else {
    check_vector(edge_codes, at::kInt, "edge_codes");
    best_codes(user_lists<int32_t>(user_indptr, user_value, edge_codes, edge_values, K), item_indptr, item_weights,
               user_begin, user_end, user_shared, dense_slot, dense_rows, items, codes, self_weight, strength, volume,
               gamma, best, gain);
  }
  return {best, gain};
}

// Per user u: sum over its edges p = (u, j) of w_uj * hist[u, code of j], in edge order; their total
// is the co-occurrence weight inside codes.
template <typename Code>
at::Tensor inside_per_user(const UserLists<Code>& users, const at::Tensor& edge_weights) {
  check_vector(edge_weights, at::kDouble, "edge_weights");
  TORCH_CHECK(edge_weights.numel() == users.edges, "recjpq_cpu: edge_weights and edge_codes differ in length");
  const double* ew = edge_weights.data_ptr<double>();
  at::Tensor sums = at::zeros({users.num_users}, edge_weights.options());
  double* out = sums.data_ptr<double>();
  const int threads = work_threads();
  std::vector<double> scratch(static_cast<size_t>(threads) * users.K, 0.0);
  std::atomic<bool> bad{false};
  auto unit_fn = [&](int64_t unit, int slot) {
    double* hist = scratch.data() + static_cast<size_t>(slot) * users.K;
    const int64_t stop = std::min(users.num_users, (unit + 1) * kRowsPerUnit);
    for (int64_t u = unit * kRowsPerUnit; u < stop; ++u) {
      const int64_t begin = users.indptr[u], end = users.indptr[u + 1];
      if (begin < 0 || begin > end || end > users.edges || !users.add(begin, end, 1.0, users.uniform[u], hist)) {
        bad.store(true, std::memory_order_relaxed);
        std::fill(hist, hist + users.K, 0.0);
        continue;
      }
      double sum = 0.0;
      for (int64_t p = begin; p < end; ++p) sum += ew[p] * hist[users.code(p)];
      for (int64_t p = begin; p < end; ++p) hist[users.code(p)] = 0.0;
      out[u] = sum;
    }
  };
  run_units((users.num_users + kRowsPerUnit - 1) / kRowsPerUnit, threads, unit_fn);
  TORCH_CHECK(!bad.load(), "recjpq_cpu: baco_inside read a code out of [0, num_codes) or a decreasing indptr");
  return sums;
}

at::Tensor baco_inside(const at::Tensor& user_indptr, const at::Tensor& user_value, const at::Tensor& edge_codes,
                       const at::Tensor& edge_values, const at::Tensor& edge_weights, int64_t num_codes) {
  TORCH_CHECK(num_codes >= 1, "recjpq_cpu: num_codes must be >= 1");
  if (edge_codes.scalar_type() == at::kByte) {
    check_vector(edge_codes, at::kByte, "edge_codes");
    return inside_per_user(user_lists<uint8_t>(user_indptr, user_value, edge_codes, edge_values, num_codes),
                           edge_weights);
  }
  check_vector(edge_codes, at::kInt, "edge_codes");
  return inside_per_user(user_lists<int32_t>(user_indptr, user_value, edge_codes, edge_values, num_codes),
                         edge_weights);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(recjpq_cpu, m) {
  m.def("baco_best_codes(Tensor item_indptr, Tensor item_weights, Tensor user_begin, Tensor user_end, "
        "Tensor user_shared, Tensor dense_slot, Tensor dense_rows, Tensor user_indptr, Tensor user_value, "
        "Tensor edge_codes, Tensor edge_values, "
        "Tensor items, Tensor codes, Tensor self_weight, Tensor strength, Tensor volume, float gamma) "
        "-> (Tensor, Tensor)",
        &baco_best_codes);
  m.def("baco_inside(Tensor user_indptr, Tensor user_value, Tensor edge_codes, Tensor edge_values, "
        "Tensor edge_weights, int num_codes) -> Tensor",
        &baco_inside);
}

}  // namespace recjpq_cpu
