"""Fused ``pq_scores``: every item's score for every query, one pass over the codes.

One program scores a tile of ``BLOCK_N`` items for ``QB`` queries, so each code load serves QB
lookups. Programs are numbered query-group fastest, so the groups reading one code tile run
side by side and share it through L2.
"""
import triton
import triton.language as tl

from recjpq.kernels.pq_lookup import INTERPRETED, score_tile

_CONFIGS = [triton.Config({"BLOCK_N": 64, "QB": 2})] if INTERPRETED else [
    triton.Config({"BLOCK_N": 256, "QB": 1}, num_warps=4),
    triton.Config({"BLOCK_N": 1024, "QB": 1}, num_warps=4),
    triton.Config({"BLOCK_N": 512, "QB": 4}, num_warps=4),
]


def _prune(configs, named_args, **kwargs):
    batch = {**named_args, **kwargs}["B_BUCKET"]
    return [c for c in configs if c.kwargs["QB"] <= batch] or configs[:1]


@triton.autotune(configs=_CONFIGS, key=["M", "K", "B_BUCKET"], prune_configs_by={"early_config_prune": _prune})
@triton.jit(do_not_specialize=["B", "N", "B_BUCKET"])
def pq_scores_kernel(S, codes_t, stride, out, B, N, B_BUCKET, M: tl.constexpr, K: tl.constexpr,
                     BLOCK_N: tl.constexpr, QB: tl.constexpr):
    pid = tl.program_id(0)
    groups = tl.cdiv(B, QB)
    rows = (pid % groups) * QB + tl.arange(0, QB)
    items = (pid // groups) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < B
    item_ok = items < N
    scores = score_tile(S, codes_t, stride, rows, row_ok, items, item_ok, M, K)
    offsets = rows.to(tl.int64)[:, None] * N + items[None, :]
    tl.store(out + offsets, scores, mask=row_ok[:, None] & item_ok[None, :])
