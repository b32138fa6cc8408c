"""FAISS interop: the same PQ catalogue as a ``faiss.IndexPQ`` (inner product, 8-bit codes) and back.

FAISS is optional; each function imports it when called and says how to install it if absent.
The index holds every row of the codes, FAISS id = item id: a padding row is an ordinary item
there (exclude it from FAISS results yourself).
"""
from __future__ import annotations

import numpy as np
import torch

from recjpq._validate import check_codes, check_tensor
from recjpq.nn.pq_embedding import PQEmbedding


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError("recjpq.interop needs FAISS: pip install faiss-cpu (or faiss-gpu)") from None
    return faiss


def to_faiss(source):
    """A ``faiss.IndexPQ`` (``METRIC_INNER_PRODUCT``) with exactly the given codes and centroids.

    ``source`` is a ``PQEmbedding`` or a ``(codes [N, M], centroids [M, 256, d / M])`` pair (what
    ``recjpq.convert.quantize`` returns). FAISS's 8-bit PQ needs K = 256. ``index.search(q, k)``
    then ranks items by the same scores as ``recjpq.ops.pq_topk``.
    """
    if isinstance(source, PQEmbedding):
        if hasattr(source, "rotation"):
            raise ValueError("to_faiss exports plain PQ only; this embedding has a query rotation (OPQ or a "
                             "query metric): quantize without rotate=True, or multiply queries by it before "
                             "searching")
        codes, centroids = source.codes, source.subitem_embeddings
    elif isinstance(source, (tuple, list)) and len(source) == 2:
        codes, centroids = source
    else:
        raise TypeError(f"source must be a PQEmbedding or a (codes, centroids) pair, got {type(source).__name__}")
    check_codes(codes)
    check_tensor("centroids", centroids, ndim=3)
    if not centroids.is_floating_point():
        raise TypeError(f"centroids must be floating point, got {centroids.dtype}")
    num_splits, num_codes, dsub = centroids.shape
    if num_codes != 256:
        raise ValueError(f"FAISS IndexPQ with 8-bit codes needs K=256 centroids per split, got K={num_codes}")
    if codes.shape[1] != num_splits:
        raise ValueError(f"codes has M={codes.shape[1]} splits but centroids has M={num_splits}")
    codes_np = codes.detach().cpu()
    if codes_np.numel() and (int(codes_np.min()) < 0 or int(codes_np.max()) > 255):
        raise ValueError(f"codes must lie in [0, 256), got [{int(codes_np.min())}, {int(codes_np.max())}]")
    faiss = _faiss()
    index = faiss.IndexPQ(num_splits * dsub, num_splits, 8, faiss.METRIC_INNER_PRODUCT)
    faiss.copy_array_to_vector(centroids.detach().float().cpu().contiguous().reshape(-1).numpy(), index.pq.centroids)
    index.is_trained = True
    index.add_sa_codes(np.ascontiguousarray(codes_np.to(torch.uint8).numpy()))
    return index


def from_faiss(index, padding_idx: int | None = None) -> PQEmbedding:
    """A ``PQEmbedding`` holding a trained ``faiss.IndexPQ``'s codes and centroids (inner product,
    8-bit codes); its ``topk`` returns what ``index.search`` returns, item id = FAISS id."""
    faiss = _faiss()
    if not isinstance(index, faiss.IndexPQ):
        raise TypeError(f"index must be a faiss.IndexPQ, got {type(index).__name__} (OPQ/IVF wrappers are not "
                        "supported: pass the inner IndexPQ)")
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise ValueError("index must use METRIC_INNER_PRODUCT: PQEmbedding ranks by inner product, and an L2 "
                         "index ranks differently")
    if index.pq.nbits != 8:
        raise ValueError(f"only 8-bit PQ codes are supported, got nbits={index.pq.nbits}")
    if not index.is_trained or index.ntotal == 0:
        raise ValueError("index must be trained and hold at least one vector")
    num_splits, dsub = index.pq.M, index.pq.dsub
    codes = torch.from_numpy(faiss.vector_to_array(index.codes).reshape(index.ntotal, index.code_size).copy())
    centroids = torch.from_numpy(faiss.vector_to_array(index.pq.centroids).reshape(num_splits, 256, dsub).copy())
    module = PQEmbedding(codes, num_splits * dsub, 256, padding_idx)
    with torch.no_grad():
        module.subitem_embeddings.copy_(centroids)
    return module
