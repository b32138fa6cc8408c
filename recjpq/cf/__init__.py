"""Collaborative filtering on a user-item graph: MF-BPR and LightGCN with full, BACO-shared, hashed or
low-rank embedding tables, full-ranking Recall@K / NDCG@K (the NGCF / LightGCN protocol)."""
from recjpq.cf.data import CFData, load_cf
from recjpq.cf.metrics import full_ranking
from recjpq.cf.models import MF, LightGCN, normalized_adjacency
from recjpq.cf.train import CFConfig, build_tables, fit

__all__ = ["CFData", "load_cf", "full_ranking", "MF", "LightGCN", "normalized_adjacency", "CFConfig", "build_tables",
           "fit"]
