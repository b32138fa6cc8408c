// Safe dynamic pruning for PQ top-k (in the spirit of RecJPQPrune, SIGIR'25).
//
// Per query, the sub-ids of each split are ranked by score. Items are reached through an inverted
// index (split, sub-id) -> items, best sub-ids first, one (split, rank) list at a time, and scored
// exactly. An item not reached yet has, in every split, a sub-id ranked below the ones processed,
// so its score is at most sigma = sum_m S[m, next unprocessed sub-id of m] (summed in split order,
// which bounds the float sum too because rounding is monotone). The scan stops once sigma is below
// the k-th best score: the result is the exact top-k, ties to the lower index.
#include "pq_common.h"

#include <ATen/Parallel.h>

#include <numeric>

namespace recjpq_cpu {
namespace {

constexpr int64_t kPrefetch = 16;  // items ahead in a posting list whose codes are prefetched

// The pruning index, derived from the blocked snapshot of the codes (block_codes), never from the
// caller's tensor, which another thread may change between two reads: CSR per split, where the items
// whose code in split m is j are items[m * N + offsets[m, j] .. offsets[m, j + 1]), ascending; and
// `rows`, the same snapshot row-major [N, M], from which the kernel reads a reached item's M codes
// in one cache line. Built once per snapshot and K.
std::tuple<at::Tensor, at::Tensor, at::Tensor> prune_index(const at::Tensor& blocked, int64_t n, int64_t num_codes) {
  check_blocked(blocked, n);
  const int64_t M = blocked.size(1), num_blocks = blocked.size(0);
  TORCH_CHECK(n < (int64_t{1} << 31), "recjpq_cpu: the inverted index holds int32 item ids, N=", n, " is too large");
  TORCH_CHECK(num_codes >= 1, "recjpq_cpu: num_codes must be >= 1");
  at::Tensor offsets = at::zeros({M, num_codes + 1}, blocked.options().dtype(at::kLong));
  at::Tensor items = at::empty({M * n}, blocked.options().dtype(at::kInt));
  at::Tensor rows = at::empty({n, M}, blocked.options());
  dispatch_codes(blocked.scalar_type(), [&](auto tag) {
    using CodeT = decltype(tag);
    const CodeT* src = blocked.data_ptr<CodeT>();
    auto code = [&](int64_t i, int64_t m) { return static_cast<int64_t>(src[((i / kBlock) * M + m) * kBlock + i % kBlock]); };
    int64_t* off = offsets.data_ptr<int64_t>();
    int32_t* dst = items.data_ptr<int32_t>();
    at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        int64_t* row = off + m * (num_codes + 1);
        for (int64_t i = 0; i < n; ++i) {
          const int64_t c = code(i, m);
          TORCH_CHECK(c >= 0 && c < num_codes, "recjpq_cpu: code out of range [0, ", num_codes, ")");
          ++row[c + 1];
        }
        std::partial_sum(row, row + num_codes + 1, row);
        std::vector<int64_t> next(row, row + num_codes);
        for (int64_t i = 0; i < n; ++i) dst[m * n + next[code(i, m)]++] = static_cast<int32_t>(i);
      }
    });
    CodeT* out = rows.data_ptr<CodeT>();
    at::parallel_for(0, num_blocks, 256, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t j = 0; j < std::min(kBlock, n - b * kBlock); ++j)
          for (int64_t m = 0; m < M; ++m) out[(b * kBlock + j) * M + m] = src[(b * M + m) * kBlock + j];
      }
    });
  });
  return {offsets, items, rows};
}

// A min-heap of the k best keys seen so far, in any item order.
class HeapTopK {
 public:
  explicit HeapTopK(int64_t k) : k_(k) { keys_.reserve(k); }
  bool full() const { return static_cast<int64_t>(keys_.size()) == k_; }
  float kth_score() const { return key_score(keys_.front()); }
  void push(int64_t key) {
    if (!full()) {
      keys_.push_back(key);
      std::push_heap(keys_.begin(), keys_.end(), std::greater<int64_t>());
    } else if (key > keys_.front()) {
      std::pop_heap(keys_.begin(), keys_.end(), std::greater<int64_t>());
      keys_.back() = key;
      std::push_heap(keys_.begin(), keys_.end(), std::greater<int64_t>());
    }
  }
  std::vector<int64_t>& keys() { return keys_; }
  void clear() { keys_.clear(); }

 private:
  int64_t k_;
  std::vector<int64_t> keys_;
};

// `rows`, `offsets` and `items` come from prune_index. Returns (values, indices, visited): visited[b] counts the items query b scored; a query that hit
// `max_visits` before its bound proved the top-k stops there and reports visited = -1 (its row is
// then not valid, and the caller rescans it exhaustively).
std::tuple<at::Tensor, at::Tensor, at::Tensor> pq_topk_prune(const at::Tensor& S, const at::Tensor& rows,
                                                             const at::Tensor& offsets, const at::Tensor& items,
                                                             int64_t k, const c10::optional<at::Tensor>& exclude,
                                                             int64_t max_visits) {
  TORCH_CHECK(rows.device().is_cpu() && rows.dim() == 2 && rows.is_contiguous(),
              "recjpq_cpu: rows must be the contiguous CPU tensor [N, M] that prune_index returns");
  const int64_t n = rows.size(0), M = rows.size(1);
  check_table(S, M);
  check_finite(S);
  const int64_t batch = S.size(0), K = S.size(2);
  TORCH_CHECK(k >= 1 && k <= n, "recjpq_cpu: k must be in [1, N=", n, "], got ", k);
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.dim() == 2 &&
                  offsets.size(0) == M && offsets.size(1) == K + 1,
              "recjpq_cpu: offsets must be contiguous int64 [M, K + 1] (build the index with the same K)");
  TORCH_CHECK(items.scalar_type() == at::kInt && items.is_contiguous() && items.numel() == M * n,
              "recjpq_cpu: items must be contiguous int32 [M * N]");
  const ExcludeLists excluded(exclude, batch, n);
  at::Tensor values = at::empty({batch, k}, S.options());
  at::Tensor indices = at::empty({batch, k}, S.options().dtype(at::kLong));
  at::Tensor visited = at::empty({batch}, S.options().dtype(at::kLong));

  dispatch_codes(rows.scalar_type(), [&](auto tag) {
    using CodeT = decltype(tag);
    const CodeT* codes = rows.data_ptr<CodeT>();
    const int64_t* off = offsets.data_ptr<int64_t>();
    const int32_t* lists = items.data_ptr<int32_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint64_t> seen((n + 63) / 64);
      std::vector<int32_t> order(M * K);
      std::vector<int64_t> sub_keys(K);
      std::vector<float> table(M * K);  // a private copy of S[q]: the sort needs values that hold still
      std::vector<int64_t> rank(M);
      HeapTopK best(k);
      for (int64_t q = begin; q < end; ++q) {
        std::memcpy(table.data(), S.data_ptr<float>() + q * M * K, M * K * sizeof(float));
        for (int64_t m = 0; m < M; ++m) {
          // sub-ids by descending score, ties to the lower sub-id: packed keys are a total order
          for (int64_t c = 0; c < K; ++c) sub_keys[c] = pack_key(table[m * K + c], c);
          std::sort(sub_keys.begin(), sub_keys.end(), std::greater<int64_t>());
          for (int64_t c = 0; c < K; ++c) order[m * K + c] = static_cast<int32_t>(key_index(sub_keys[c]));
        }
        std::fill(seen.begin(), seen.end(), 0);
        std::fill(rank.begin(), rank.end(), 0);
        best.clear();
        int64_t visits = 0;
        bool done = false;
        while (!done) {
          // advance the split whose next sub-id scores highest: its list is the likeliest to hold top items
          int64_t m = -1;
          float top = -std::numeric_limits<float>::infinity();
          for (int64_t s = 0; s < M; ++s) {
            const float v = table[s * K + order[s * K + rank[s]]];
            if (m < 0 || v > top) m = s, top = v;
          }
          const int64_t sub = order[m * K + rank[m]];
          const int64_t* row = off + m * (K + 1);
          const int32_t* list = lists + m * n;
          for (int64_t p = row[sub], last = row[sub + 1]; p < last; ++p) {
            const int64_t item = list[p];
            if (p + kPrefetch < last) __builtin_prefetch(codes + list[p + kPrefetch] * M);  // a miss per item otherwise
            uint64_t& word = seen[item >> 6];
            const uint64_t bit = uint64_t{1} << (item & 63);
            if (word & bit) continue;
            word |= bit;
            ++visits;
            if (excluded.contains(q, item)) continue;
            const CodeT* c = codes + item * M;
            float score = table[c[0]];
            for (int64_t s = 1; s < M; ++s) score += table[s * K + c[s]];
            best.push(pack_key(score, item));
          }
          if (++rank[m] == K) break;  // every item has one of this split's sub-ids: all were scored
          float bound = table[order[rank[0]]];
          for (int64_t s = 1; s < M; ++s) bound += table[s * K + order[s * K + rank[s]]];
          done = best.full() && bound < best.kth_score();
          if (!done && visits >= max_visits) {
            visits = -1;
            break;
          }
        }
        visited.data_ptr<int64_t>()[q] = visits;
        write_topk(best.keys(), k, values.data_ptr<float>() + q * k, indices.data_ptr<int64_t>() + q * k);
      }
    });
  });
  return {values, indices, visited};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(recjpq_cpu, m) {
  m.def("prune_index(Tensor blocked, int n, int num_codes) -> (Tensor, Tensor, Tensor)", &prune_index);
  m.def("pq_topk_prune(Tensor S, Tensor rows, Tensor offsets, Tensor items, int k, Tensor? exclude, "
        "int max_visits) -> (Tensor, Tensor, Tensor)",
        &pq_topk_prune);
}

}  // namespace recjpq_cpu
