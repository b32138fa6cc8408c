"""Modules built on ``recjpq.ops``."""
from recjpq.nn.pq_embedding import PQEmbedding

__all__ = ["PQEmbedding"]
