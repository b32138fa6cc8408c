from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from recjpq.codes import baco

STRATEGIES = ("svd", "random", "baco", "spectral")


def codes_dtype(num_codes: int) -> torch.dtype:
    """The narrowest code dtype for K sub-ids per split."""
    if num_codes <= 256:
        return torch.uint8
    if num_codes <= 1 << 15:
        return torch.int16
    return torch.int32


def _as_numpy(name: str, x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if x.size and not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {x.dtype}")
    return x.astype(np.int64, copy=False)


def interaction_matrix(interactions, num_items: int) -> sp.csr_matrix:
    """A user x item count matrix (float32 CSR) from ``(user_ids, item_ids)`` or a scipy matrix."""
    if sp.issparse(interactions):
        mat = sp.csr_matrix(interactions, dtype=np.float32)
        if mat.shape[1] != num_items:
            raise ValueError(f"interactions matrix has {mat.shape[1]} item columns but num_items={num_items}")
        return mat
    if not (isinstance(interactions, (tuple, list)) and len(interactions) == 2):
        raise TypeError("interactions must be a pair (user_ids, item_ids) or a scipy sparse user x item matrix")
    users, items = _as_numpy("user_ids", interactions[0]), _as_numpy("item_ids", interactions[1])
    if users.shape != items.shape:
        raise ValueError(f"user_ids and item_ids differ in length: {users.size} vs {items.size}")
    if users.size and users.min() < 0:
        raise ValueError(f"user_ids must be >= 0, got {users.min()}")
    if items.size and (items.min() < 0 or items.max() >= num_items):
        raise ValueError(f"item_ids must lie in [0, num_items={num_items}), got [{items.min()}, {items.max()}]")
    num_users = int(users.max()) + 1 if users.size else 0
    data = np.ones(users.size, dtype=np.float32)
    return sp.csr_matrix((data, (users, items)), shape=(num_users, num_items))  # duplicates are summed


def _orthonormalize(y: np.ndarray) -> np.ndarray:
    """Orthonormal columns spanning ``y`` (tall and thin) by Cholesky-QR run twice, in float64.

    Far cheaper than Householder QR on a million rows, and the second pass restores the
    orthogonality the first loses when power iterations make the columns nearly parallel.
    """
    q = y.astype(np.float64)
    for _ in range(2):
        gram = q.T @ q
        gram[np.diag_indices_from(gram)] += 1e-12 * np.trace(gram) + 1e-300
        q = q @ np.linalg.inv(np.linalg.cholesky(gram)).T  # a k x k inverse: one thin GEMM
    return q.astype(np.float32)  # the sparse products stay in the matrix's float32


def _item_components(mat: sp.csr_matrix, rank: int, rng: np.random.Generator, oversample: int = 10,
                     power_iters: int = 3) -> np.ndarray:
    """The top ``rank`` right singular vectors ``[rank, num_items]`` by randomized SVD.

    Components beyond the matrix's rank are filled with noise, which the binning turns into
    random (still valid, balanced) codes.
    """
    num_users, num_items = mat.shape
    width = min(rank + oversample, num_users, num_items)
    out = rng.standard_normal((rank, num_items)).astype(np.float32)
    if width == 0 or mat.nnz == 0:
        return out
    mat_t = mat.T.tocsr()
    basis = _orthonormalize(mat_t @ rng.standard_normal((num_users, width), dtype=np.float32))  # items x width
    for _ in range(power_iters):
        basis = _orthonormalize(mat_t @ _orthonormalize(mat @ basis))
    _, _, vt = np.linalg.svd(mat @ basis, full_matrices=False)  # the matrix restricted to the basis
    comps = (basis @ vt.T).T  # width x items, by decreasing singular value
    keep = min(rank, comps.shape[0])
    out[:keep] = comps[:keep]
    return out


def _equal_frequency_bins(values: np.ndarray, num_codes: int, rng: np.random.Generator) -> np.ndarray:
    """Cut one component into ``num_codes`` quantile bins (RecJPQ's SVD strategy)."""
    lo, hi = values.min(), values.max()
    scaled = (values - lo) / (hi - lo + 1e-10)
    scaled = scaled + rng.normal(0.0, 1e-5, size=values.shape)  # break ties so bins stay equal
    order = np.argsort(scaled, kind="stable")
    ranks = np.empty_like(order)
    ranks[order] = np.arange(values.size)
    return ranks * num_codes // values.size


def assign_codes(interactions, num_items: int, num_splits: int, num_codes: int = 256,
                 strategy: str = "svd", seed: int = 0) -> torch.Tensor:
    """Item codes ``[num_items, num_splits]`` with values in ``[0, num_codes)``.

    ``interactions``: ``(user_ids, item_ids)`` 1-D integer arrays/tensors, or a scipy sparse
    user x item matrix. ``"svd"``: one truncated-SVD item component per split, each cut into
    equal-frequency bins, so similar items share sub-ids; ``"random"``: independent uniform codes;
    ``"baco"``: spectral codes refined by balanced co-clustering (``recjpq.codes.baco.item_codes``);
    ``"spectral"``: BACO's spectral start alone, no split refined (7-45x faster to assign, and what
    the refinement is measured against in docs/baco.md).
    Items without interactions still get valid codes. Deterministic for a seed. The dtype is
    uint8 for K <= 256, else int16/int32.
    """
    if isinstance(num_items, bool) or not isinstance(num_items, int) or num_items <= 0:
        raise ValueError(f"num_items must be a positive int, got {num_items!r}")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits <= 0:
        raise ValueError(f"num_splits must be a positive int, got {num_splits!r}")
    if isinstance(num_codes, bool) or not isinstance(num_codes, int) or num_codes < 2:
        raise ValueError(f"num_codes must be an int >= 2, got {num_codes!r}")
    rng = np.random.default_rng(seed)
    if strategy == "random":
        if interactions is not None:
            interaction_matrix(interactions, num_items)  # validate even though unused
        codes = rng.integers(0, num_codes, size=(num_items, num_splits))
    elif strategy == "svd":
        comps = _item_components(interaction_matrix(interactions, num_items), num_splits, rng)
        codes = np.stack([_equal_frequency_bins(c, num_codes, rng) for c in comps], axis=1)
    elif strategy in ("baco", "spectral"):
        codes = baco.item_codes(interaction_matrix(interactions, num_items), num_items, num_splits, num_codes,
                                seed=seed, refined_splits=0 if strategy == "spectral" else None).numpy()
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return torch.from_numpy(np.ascontiguousarray(codes)).to(codes_dtype(num_codes))
