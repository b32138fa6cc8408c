"""Item code assignment: which sub-item id each item gets in each split, fixed before training."""
from recjpq.codes.assign import STRATEGIES, assign_codes, codes_dtype, interaction_matrix
from recjpq.codes.baco import CoClusters, LevelCodes, co_cluster, level_codes

__all__ = ["assign_codes", "STRATEGIES", "codes_dtype", "interaction_matrix", "co_cluster", "CoClusters", "level_codes",
           "LevelCodes"]
