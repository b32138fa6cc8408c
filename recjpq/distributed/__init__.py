"""A catalogue sharded over the ranks of a ``torch.distributed`` process group (gloo or NCCL).

``CatalogueShard`` holds this rank's contiguous rows of the codes; ``pq_topk`` and
``pq_cross_entropy`` are the ``recjpq.ops`` of the same names over the whole sharded catalogue,
exact against single-process results. ``all_gather_rows`` and ``softmax_cross_entropy``
connect data-parallel rows to the sharded output layer; ``recjpq.distributed.training`` wires
all of it into ``recjpq train`` under torchrun. See docs/distributed.md.
"""
from recjpq.distributed.catalogue import CatalogueShard, even_bounds
from recjpq.distributed.collectives import all_gather_rows
from recjpq.distributed.cross_entropy import pq_cross_entropy, softmax_cross_entropy
from recjpq.distributed.topk import local_candidates, merge_candidates, pq_topk

__all__ = ["CatalogueShard", "even_bounds", "pq_topk", "local_candidates", "merge_candidates", "pq_cross_entropy",
           "softmax_cross_entropy", "all_gather_rows"]
