"""Hand-written CUDA backend (csrc/cuda): fused PQ scoring and exact top-k with S in shared memory.

The kernels come from ``recjpq._C_cuda`` (built by ``pip install --no-build-isolation .`` when a
CUDA torch and nvcc are present) or, on a GPU machine without it, from a JIT build of csrc/cuda
with ninja: call ``build_jit()`` or set ``RECJPQ_CUDA_JIT=1`` before the first CUDA op.

This module also owns the launch plan (query group, candidate buffer, grid) and every limit the
kernels impose, checked in Python before a launch so errors name the argument; the plan is a pure
function of the shapes and the device limits, so it is tested without a GPU.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import os

import torch

from recjpq.topk_keys import unpack_keys

MAX_K = 1024  # RECJPQ_CUDA_MAX_K: candidate buffers live in shared memory
THREADS = 256  # RECJPQ_CUDA_THREADS: items per tile, one per thread
QUERY_GROUPS = (4, 2, 1)  # queries sharing one code load, largest first
MAX_QUERY_GROUPS = 65535  # query groups ride on gridDim.y
MAX_ITEMS = (1 << 32) - 1  # packed keys hold 2^32 - 1 - item in 32 bits
_STATIC_SMEM_RESERVE = 1024  # the kernels' static shared memory (counters, thresholds), rounded up
_TARGET_CTAS_PER_SM = 2  # at least two resident CTAs per SM hide the shared-memory latency
_MAX_THREADS_PER_SM = 2048
# Each CTA hands k candidates per query to the final torch.topk: at most N / 8 of them in all,
# whatever k (k = 1024 at N = 1.27M: 155 CTAs, 1.3 MB of keys instead of 1,056 CTAs and 8.6 MB).
_ITEMS_PER_CANDIDATE = 8

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc", "cuda")


@dataclasses.dataclass(frozen=True)
class DeviceLimits:
    sm_count: int
    smem_per_block: int  # opt-in maximum of dynamic + static shared memory per CTA
    smem_per_sm: int



@functools.cache
def device_limits(device: torch.device) -> DeviceLimits:
    props = torch.cuda.get_device_properties(device)
    return DeviceLimits(props.multi_processor_count,
                        getattr(props, "shared_memory_per_block_optin", 48 * 1024),
                        getattr(props, "shared_memory_per_multiprocessor", 100 * 1024))


@dataclasses.dataclass(frozen=True)
class Plan:
    query_group: int  # QB: queries per CTA
    buffer_len: int  # candidate keys per query in shared memory (0 for pq_scores)
    grid_x: int  # CTAs per query group, striding over item tiles
    smem: int  # dynamic shared memory per CTA, in bytes


def _align16(nbytes: int) -> int:
    return (nbytes + 15) & ~15


def smem_bytes(m: int, num_codes: int, query_group: int, buffer_len: int = 0) -> int:
    """Mirror of ``recjpq_pq_topk_smem_bytes`` / ``recjpq_pq_scores_smem_bytes`` in pq_kernels.h."""
    return _align16(query_group * m * num_codes * 4) + query_group * buffer_len * 8


def buffer_len(k: int) -> int:
    """A power of two >= k + THREADS: after a shrink to k keys, one tile (THREADS items) still fits."""
    return 1 << (k + THREADS - 1).bit_length()


def plan(batch: int, n: int, m: int, num_codes: int, limits: DeviceLimits, k: int | None = None) -> Plan:
    """Launch shape of pq_topk (``k`` given) or pq_scores; ValueError if the problem does not fit.

    The query group is the largest that keeps ``_TARGET_CTAS_PER_SM`` CTAs resident (else the
    largest that fits at all) and is no larger than the batch needs; the grid fills the GPU, but
    for top-k hands at most N / 8 candidate keys per query to the final merge.
    """
    if k is not None and k > MAX_K:
        raise ValueError(f"k must be <= {MAX_K} for the cuda backend, got k={k}; use backend='triton' or 'reference'")
    if n > MAX_ITEMS:
        raise ValueError(f"codes must have N <= {MAX_ITEMS} items for the cuda backend, got N={n}")
    length = 0 if k is None else buffer_len(k)
    budget = limits.smem_per_block - _STATIC_SMEM_RESERVE
    fitting = [qb for qb in QUERY_GROUPS if smem_bytes(m, num_codes, qb, length) <= budget]
    if not fitting:
        raise ValueError(
            f"S of shape [B, M={m}, K={num_codes}] needs {smem_bytes(m, num_codes, 1, length)} bytes of shared "
            f"memory per query{'' if k is None else f' with k={k}'}, more than the {budget} this GPU offers; "
            "use backend='triton' or 'reference'")
    useful = [qb for qb in fitting if qb < 2 * batch] or [1]  # QB=2 for B=1 would waste half its smem

    def per_sm(qb: int) -> int:
        return min(limits.smem_per_sm // (smem_bytes(m, num_codes, qb, length) + _STATIC_SMEM_RESERVE),
                   _MAX_THREADS_PER_SM // THREADS)

    resident = [qb for qb in useful if per_sm(qb) >= _TARGET_CTAS_PER_SM]
    qb = (resident or useful)[0]
    groups = -(-batch // qb)
    if groups > MAX_QUERY_GROUPS:
        raise ValueError(f"S must have B <= {MAX_QUERY_GROUPS * qb} queries for the cuda backend at this shape, "
                         f"got B={batch}")
    grid_x = _grid_x(groups, limits.sm_count * max(1, per_sm(qb)), -(-n // THREADS))
    if k is not None:
        grid_x = max(1, min(grid_x, n // (_ITEMS_PER_CANDIDATE * k)))
    return Plan(qb, length, grid_x, smem_bytes(m, num_codes, qb, length))


def _grid_x(groups: int, slots: int, tiles: int) -> int:
    """CTAs per query group: enough to fill all ``slots`` resident CTAs, and, of up to 4x that,
    the fewest whose last wave is fullest (512 groups on 396 slots: 3 waves of which 2.6 busy)."""
    first = max(1, -(-slots // groups))
    options = range(first, min(tiles, 4 * first) + 1)
    if not options:
        return max(1, min(tiles, first))

    def busy(g: int) -> float:
        total = groups * g
        return total / (-(-total // slots) * slots)

    return max(options, key=lambda g: (round(busy(g), 2), -g))


# ---------------------------------------------------------------------------------------------
# The compiled extension: installed, or JIT-built from csrc/cuda.

@functools.cache
def _extension_error() -> str | None:
    """Why torch.ops.recjpq_cuda is missing, or None once the ops are registered."""
    try:
        import recjpq._C_cuda  # noqa: F401  (registers torch.ops.recjpq_cuda.*)
        return None
    except ImportError as e:
        installed_error = str(e)
    if os.environ.get("RECJPQ_CUDA_JIT") == "1":
        return _jit_load()
    return (f"recjpq._C_cuda is not built ({installed_error}); reinstall with a CUDA torch and nvcc "
            "(pip install --no-build-isolation -e .), or set RECJPQ_CUDA_JIT=1 / call "
            "recjpq.backends.cuda.build_jit() to compile csrc/cuda with ninja")


def _jit_load() -> str | None:
    from torch.utils import cpp_extension

    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return f"the JIT build needs a CUDA torch and nvcc (torch.version.cuda={torch.version.cuda})"
    if not os.path.isdir(_CSRC):
        return f"the JIT build needs recjpq's source tree ({_CSRC} not found); install from a checkout"
    sources = sorted(glob.glob(os.path.join(_CSRC, "*.cu")) + glob.glob(os.path.join(_CSRC, "*.cpp")))
    try:
        cpp_extension.load("recjpq_C_cuda", sources, extra_cflags=["-O3", "-std=c++17"],
                           extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo"], extra_include_paths=[_CSRC])
    except Exception as e:  # compiler errors come as RuntimeError / CalledProcessError
        return f"the JIT build of {_CSRC} failed: {e}"
    return None


def build_jit() -> None:
    """Compile csrc/cuda now (ninja, cached under ~/.cache/torch_extensions) and enable the backend."""
    from recjpq import backends

    _extension_error.cache_clear()
    os.environ["RECJPQ_CUDA_JIT"] = "1"
    error = _extension_error()
    if error is not None:
        raise RuntimeError(error)
    backends._reason.cache_clear()


def unavailable_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return "the cuda backend runs on CUDA tensors only"
    if not torch.cuda.is_available():
        return "torch has no usable CUDA device"
    return _extension_error()


def shape_unsupported(op: str, shape: dict, device: torch.device) -> str | None:
    """Why this backend cannot run ``op`` at ``shape`` (sizes B, N, M, K, k) on ``device``, or None;
    lets ``backend=None`` fall back to another backend instead of failing."""
    try:
        plan(shape["B"], shape["N"], shape["M"], shape["K"], device_limits(device), shape.get("k"))
    except ValueError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------
# Ops (validated inputs; see recjpq/backends/__init__.py).

def pq_scores(S: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    batch, m, num_codes = S.shape
    p = plan(batch, codes.shape[0], m, num_codes, device_limits(S.device))
    return torch.ops.recjpq_cuda.pq_scores(S, codes, p.query_group, p.grid_x)


def sorted_exclusions(exclude: torch.Tensor | None) -> torch.Tensor | None:
    """Rows sorted ascending, for the kernel's binary search; None when nothing is excluded."""
    if exclude is None or exclude.shape[1] == 0:
        return None
    return torch.sort(exclude, dim=1).values.contiguous()


def merge_candidates(candidates: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of the per-CTA candidate keys ``[B, grid_x, k]`` -> (values, indices)."""
    keys = candidates.view(candidates.shape[0], -1)
    best = torch.topk(keys, k, dim=1).values
    return unpack_keys(best)


def pq_topk(S, codes, k, exclude=None, algorithm="auto"):
    del algorithm  # one exact algorithm: a threshold-filtered scan of every item
    batch, m, num_codes = S.shape
    p = plan(batch, codes.shape[0], m, num_codes, device_limits(S.device), k)
    candidates = torch.ops.recjpq_cuda.pq_topk_candidates(
        S, codes, sorted_exclusions(exclude), k, p.buffer_len, p.query_group, p.grid_x)
    return merge_candidates(candidates, k)

