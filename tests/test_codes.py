"""Code assignment: valid, balanced, deterministic, and SVD codes follow the interaction data."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recjpq.codes import assign_codes


def planted_interactions(num_users=600, num_items=400, groups=4, per_user=20, seed=0):
    """Users of group g interact only with items of group g."""
    rng = np.random.default_rng(seed)
    users, items = [], []
    for u in range(num_users):
        g = u % groups
        pool = np.arange(g, num_items, groups)
        users += [u] * per_user
        items += rng.choice(pool, per_user).tolist()
    return np.array(users), np.array(items)


@pytest.mark.parametrize("strategy", ["svd", "random"])
@pytest.mark.parametrize("num_codes, dtype", [(16, torch.uint8), (256, torch.uint8), (1000, torch.int16)])
def test_codes_are_valid_and_deterministic(strategy, num_codes, dtype):
    inter = planted_interactions()
    codes = assign_codes(inter, 400, 3, num_codes, strategy=strategy, seed=1)
    assert codes.shape == (400, 3) and codes.dtype == dtype
    assert int(codes.min()) >= 0 and int(codes.max()) < num_codes
    assert torch.equal(codes, assign_codes(inter, 400, 3, num_codes, strategy=strategy, seed=1))
    assert not torch.equal(codes, assign_codes(inter, 400, 3, num_codes, strategy=strategy, seed=2))


def test_svd_bins_are_equal_frequency():
    codes = assign_codes(planted_interactions(), 400, 4, 16)
    for m in range(4):
        counts = torch.bincount(codes[:, m].long(), minlength=16)
        assert counts.min() == 25 and counts.max() == 25  # 400 items / 16 bins exactly


def test_svd_codes_follow_planted_groups():
    """Items of the same group end up with the same sub-id far more often than by chance."""
    codes = assign_codes(planted_interactions(), 400, 3, 4)
    group = torch.arange(400) % 4
    same_group = group[:, None] == group[None, :]
    shared = (codes[:, None, :] == codes[None, :, :]).float().mean(-1)
    assert shared[same_group].mean() > 2 * shared[~same_group].mean()


def test_items_without_interactions_get_valid_codes():
    users, items = planted_interactions()
    keep = items < 300  # items 300..399 never seen
    codes = assign_codes((users[keep], items[keep]), 400, 3, 16)
    assert codes.shape == (400, 3) and int(codes.max()) < 16


def test_inputs_forms_agree():
    users, items = planted_interactions()
    mat = sp.csr_matrix((np.ones(users.size), (users, items)), shape=(600, 400))
    a = assign_codes((users, items), 400, 3, 16)
    assert torch.equal(a, assign_codes((torch.from_numpy(users), torch.from_numpy(items)), 400, 3, 16))
    assert torch.equal(a, assign_codes(mat, 400, 3, 16))


def test_more_splits_than_rank_still_valid():
    codes = assign_codes(([0, 1, 1], [0, 1, 2]), 5, 8, 4)
    assert codes.shape == (5, 8) and int(codes.max()) < 4


@pytest.mark.parametrize("args, error, match", [
    ((([0, 1], [0, 5]), 5, 2), ValueError, r"item_ids must lie in \[0, num_items=5\)"),
    ((([0, -1], [0, 1]), 5, 2), ValueError, "user_ids must be >= 0"),
    ((([0, 1], [0]), 5, 2), ValueError, "differ in length"),
    ((([0.5, 1], [0, 1]), 5, 2), TypeError, "user_ids must hold integers"),
    (((np.zeros((2, 2), int), [0, 1]), 5, 2), ValueError, "user_ids must be 1-D"),
    (("bad", 5, 2), TypeError, "interactions must be a pair"),
    ((([0], [0]), 0, 2), ValueError, "num_items must be a positive int"),
    ((([0], [0]), 5, 0), ValueError, "num_splits must be a positive int"),
    ((sp.csr_matrix((3, 4)), 5, 2), ValueError, "4 item columns but num_items=5"),
])
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        assign_codes(*args)


def test_bad_strategy_and_num_codes():
    with pytest.raises(ValueError, match="strategy must be one of"):
        assign_codes(([0], [0]), 5, 2, strategy="kmeans")
    with pytest.raises(ValueError, match="num_codes must be an int >= 2"):
        assign_codes(([0], [0]), 5, 2, num_codes=1)
