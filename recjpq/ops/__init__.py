"""The public ops. Each validates its arguments, then runs on a backend (see ``recjpq.backends``)."""
from recjpq.ops.pq_cross_entropy import pq_cross_entropy
from recjpq.ops.pq_scores import pq_scores
from recjpq.ops.pq_topk import pq_topk
from recjpq.ops.pq_topk_query import pq_topk_query
from recjpq.ops.subitem_scores import subitem_scores

__all__ = ["subitem_scores", "pq_scores", "pq_topk", "pq_topk_query", "pq_cross_entropy"]
