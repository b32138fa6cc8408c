"""recjpq: product-quantised item catalogues for sequential recommendation.

Public API: ``recjpq.ops`` (subitem_scores, pq_scores, pq_topk, pq_cross_entropy), ``recjpq.nn``
(PQEmbedding, ClusterEmbedding), ``recjpq.codes`` (assign_codes, co_cluster).
"""
from recjpq import codes, nn, ops
from recjpq.backends import available as available_backends

__version__ = "0.1.0"
__all__ = ["ops", "nn", "codes", "available_backends", "__version__"]
