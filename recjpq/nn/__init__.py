"""Modules built on ``recjpq.ops``."""
from recjpq.nn.cluster_embedding import ClusterEmbedding
from recjpq.nn.pq_embedding import PQEmbedding

__all__ = ["PQEmbedding", "ClusterEmbedding"]
