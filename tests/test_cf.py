"""recjpq.cf: LightGCN split loading, MF / LightGCN models, full-ranking metrics, training and the CLI."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recjpq.cf import CFConfig, LightGCN, MF, build_tables, fit, full_ranking, load_cf, normalized_adjacency
from recjpq.nn import ClusterEmbedding, PQEmbedding


def write_split(tmp_path, users=60, items=48, groups=4, per_user=8, test_per_user=2, seed=0):
    """Users and items in groups; a user's train and test items come from its group."""
    rng = np.random.default_rng(seed)
    with open(tmp_path / "train.txt", "w") as train, open(tmp_path / "test.txt", "w") as test:
        for u in range(users):
            picked = rng.choice(np.arange(u % groups, items, groups), per_user + test_per_user, replace=False)
            train.write(" ".join(map(str, [u, *picked[:per_user]])) + "\n")
            test.write(" ".join(map(str, [u, *picked[per_user:]])) + "\n")
    return tmp_path


def test_load_cf_reads_zero_based_lines_and_drops_repeats(tmp_path):
    (tmp_path / "train.txt").write_text("0 1 2 2\n1 0\n\n2 3\n")
    (tmp_path / "test.txt").write_text("0 3\n1 4\n")
    data = load_cf(str(tmp_path))
    assert (data.num_users, data.num_items) == (3, 5)
    assert data.train_users.tolist() == [0, 0, 1, 2] and data.train_items.tolist() == [1, 2, 0, 3]
    assert data.test.nnz == 2 and data.test[1, 4] == 1.0


@pytest.mark.parametrize("text,match", [("0 a\n", "integer"), ("0 -1\n", ">= 0"), ("", "no")])
def test_load_cf_rejects_bad_files(tmp_path, text, match):
    (tmp_path / "train.txt").write_text(text)
    (tmp_path / "test.txt").write_text("0 1\n")
    with pytest.raises(ValueError, match=match):
        load_cf(str(tmp_path))


def test_load_cf_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.txt"):
        load_cf(str(tmp_path))


def test_full_ranking_matches_brute_force():
    rng = np.random.default_rng(1)
    users, items = torch.randn(7, 4, generator=torch.Generator().manual_seed(0)), torch.randn(30, 4)
    train = sp.csr_matrix((rng.random((7, 30)) < 0.2).astype(np.float32))
    wanted = (rng.random((7, 30)) < 0.15) & (train.toarray() == 0)
    wanted[6] = False  # a user without test items is not evaluated
    test = sp.csr_matrix(wanted.astype(np.float32))
    got = full_ranking(users, items, train, test, k=5)
    scores = (users @ items.T).numpy()
    recalls, ndcgs = [], []
    for u in range(7):
        wanted = set(test[u].indices)
        if not wanted:
            continue
        ranked = [i for i in np.argsort(-scores[u], kind="stable") if i not in set(train[u].indices)][:5]
        hits = [i in wanted for i in ranked]
        recalls.append(sum(hits) / len(wanted))
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        ndcgs.append(dcg / sum(1 / math.log2(r + 2) for r in range(min(len(wanted), 5))))
    assert got["users"] == len(recalls)
    assert got["recall@5"] == pytest.approx(np.mean(recalls)) and got["ndcg@5"] == pytest.approx(np.mean(ndcgs))


def test_full_ranking_rejects_mismatched_shapes():
    train = sp.csr_matrix((3, 5), dtype=np.float32)
    with pytest.raises(ValueError, match="embeddings"):
        full_ranking(torch.zeros(3, 4), torch.zeros(5, 2), train, train)
    with pytest.raises(ValueError, match="must both be"):
        full_ranking(torch.zeros(3, 4), torch.zeros(6, 4), train, train)


def test_normalized_adjacency_is_symmetric_and_normalised():
    adj = normalized_adjacency(np.array([0, 0, 1]), np.array([0, 1, 1]), 2, 2).to_dense()
    assert torch.allclose(adj, adj.T)
    # user 0 (degree 2) - item 0 (degree 1): 1 / sqrt(2 * 1)
    assert adj[0, 2].item() == pytest.approx(2 ** -0.5)
    assert adj[0, 0].item() == 0.0


def test_lightgcn_propagation_and_gradient_match_dense():
    users, items = torch.nn.Embedding(3, 4), torch.nn.Embedding(5, 4)
    adj = normalized_adjacency(np.array([0, 1, 2, 2]), np.array([0, 1, 3, 4]), 3, 5)
    model = LightGCN(users, items, adj, layers=2)
    u, i, u0, i0 = model(torch.tensor([0, 2]), torch.tensor([3, 1]))
    ego = torch.cat([users.weight, items.weight])
    a = adj.to_dense()
    mean = (ego + a @ ego + a @ a @ ego) / 3
    assert torch.allclose(u, mean[[0, 2]], atol=1e-6) and torch.allclose(i, mean[[3 + 3, 1 + 3]], atol=1e-6)
    assert torch.equal(u0, users.weight[[0, 2]])
    (u * i).sum().backward()
    ego_ref = ego.detach().clone().requires_grad_()
    ref = (ego_ref + a @ ego_ref + a @ a @ ego_ref) / 3
    (ref[[0, 2]] * ref[[6, 4]]).sum().backward()
    assert torch.allclose(users.weight.grad, ego_ref.grad[:3], atol=1e-6)
    with pytest.raises(ValueError, match="adjacency"):
        LightGCN(users, torch.nn.Embedding(4, 4), adj)


@pytest.mark.parametrize("embedding", ["full", "baco", "hash", "lowrank"])
def test_build_tables_respect_the_budget(tmp_path, embedding):
    data = load_cf(str(write_split(tmp_path)))
    config = CFConfig(embedding=embedding, dim=16, budget=0.25, tables=2)
    users, items = build_tables(config, data)
    params = users.weight.numel() + items.weight.numel()
    full = (data.num_users + data.num_items) * 16
    assert params <= (full if embedding == "full" else 0.25 * full)
    assert users.num_embeddings == data.num_users and items.num_embeddings == data.num_items
    # dense gradients: Adam's momentum keeps moving a row between its batches, as in the reference code
    assert not getattr(users, "sparse", False) and not getattr(items, "sparse", False)
    if embedding in ("baco", "hash"):
        assert isinstance(users, ClusterEmbedding) and users.num_rows == (6, 6)  # 0.25 * 108 entities // 4 tables


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_fit_learns_planted_groups_and_writes_outputs(tmp_path, model):
    data = load_cf(str(write_split(tmp_path)))
    config = CFConfig(model=model, dim=16, epochs=8, batch_size=64, lr=0.02, eval_every=4, layers=2)
    summary = fit(config, data, str(tmp_path / "out"), progress=False, log=None)
    # random ranking of the 36 unseen items finds 2 of 12 group items in the top 20 about 0.56 of the time
    assert summary["best"]["recall@20"] > 0.8
    assert [row["epoch"] for row in summary["history"]] == [4, 8]
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["best"] == summary["best"] and written["embedding_params"] == (60 + 48) * 16
    assert (tmp_path / "out" / "checkpoint.pt").exists() and (tmp_path / "out" / "best.pt").exists()


def test_negatives_avoid_the_users_training_items():
    from recjpq.cf.train import _negatives

    # user 0 has trained on items 0..8 of 10, user 1 on item 3 only
    users, items = torch.tensor([0] * 9 + [1]), torch.tensor(list(range(9)) + [3])
    keys = (users * 10 + items).sort().values
    batch = torch.tensor([0, 1] * 500)
    neg = _negatives(keys, batch, 10, torch.Generator().manual_seed(0))
    assert set(neg[batch == 0].tolist()) == {9}
    assert set(neg[batch == 1].tolist()) == set(range(10)) - {3}


def test_fit_rejects_a_user_without_unseen_items(tmp_path):
    (tmp_path / "train.txt").write_text("0 0 1 2\n1 0\n")
    (tmp_path / "test.txt").write_text("1 2\n")
    with pytest.raises(ValueError, match="every item"):
        fit(CFConfig(dim=4, epochs=1), load_cf(str(tmp_path)), progress=False, log=None)


def test_fit_resumes_from_checkpoint_and_stops_at_time_limit(tmp_path):
    data = load_cf(str(write_split(tmp_path)))
    out = str(tmp_path / "out")
    fit(CFConfig(dim=8, epochs=2, batch_size=64, eval_every=1), data, out, progress=False, log=None)
    resumed = fit(CFConfig(dim=8, epochs=4, batch_size=64, eval_every=1), data, out, progress=False, resume=True,
                  log=None)
    assert [row["epoch"] for row in resumed["history"]] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="another configuration"):
        fit(CFConfig(dim=8, epochs=4, batch_size=64, eval_every=1, lr=0.5), data, out, progress=False, resume=True,
            log=None)
    limited = fit(CFConfig(dim=8, epochs=50, batch_size=64, eval_every=10, time_limit=0.0), data,
                  str(tmp_path / "limited"), progress=False, log=None)
    assert limited["stopped"] == "time limit" and limited["epochs_run"] == 1 and len(limited["history"]) == 1
    assert limited["history"][0]["steps"] == 1  # the limit also ends an epoch early


def test_fit_resumes_a_checkpoint_written_before_newer_config_fields(tmp_path):
    data = load_cf(str(write_split(tmp_path)))
    out = tmp_path / "out"
    fit(CFConfig(dim=8, epochs=1, batch_size=64, eval_every=1), data, str(out), progress=False, log=None)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    for name in ("codes", "splits", "num_codes"):  # absent from the checkpoints of earlier versions
        del state["config"][name]
    torch.save(state, out / "checkpoint.pt")
    resumed = fit(CFConfig(dim=8, epochs=2, batch_size=64, eval_every=1), data, str(out), progress=False,
                  resume=True, log=None)
    assert [row["epoch"] for row in resumed["history"]] == [1, 2]


@pytest.mark.parametrize("model", ["mf", "lightgcn"])
def test_recjpq_items_learn_planted_groups(tmp_path, model):
    data = load_cf(str(write_split(tmp_path)))
    config = CFConfig(model=model, embedding="recjpq", codes="svd", splits=4, num_codes=4, dim=16, epochs=8,
                      batch_size=64, lr=0.02, eval_every=8, layers=2)
    users, items = build_tables(config, data)
    assert isinstance(items, PQEmbedding) and items.codes.shape == (48, 4) and int(items.codes.max()) < 4
    summary = fit(config, data, str(tmp_path / "out"), progress=False, log=None)
    assert summary["best"]["recall@20"] > 0.8  # random: about 0.56 (above)
    assert summary["embedding_params"] == 60 * 16 + 4 * 4 * 4
    with pytest.raises(ValueError, match="codes must be one of"):
        fit(CFConfig(embedding="recjpq", codes="kmeans"), data, progress=False, log=None)


@pytest.mark.parametrize("kwargs,match", [({"model": "gru"}, "model"), ({"embedding": "pq"}, "embedding"),
                                          ({"budget": 0.0}, "budget"), ({"epochs": 0}, "epochs"),
                                          ({"lr": -1.0}, "lr"), ({"sampler": "batch"}, "sampler")])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CFConfig(**kwargs).validate()


def test_cli_train_cf(tmp_path, capsys):
    from recjpq.cli import main

    data = write_split(tmp_path)
    main(["train-cf", "--data", str(data), "--model", "mf", "--embedding", "hash", "--budget", "0.25", "--dim", "8",
          "--epochs", "2", "--eval-every", "1", "--batch-size", "64", "--out", str(tmp_path / "out"),
          "--no-progress"])
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["epochs_run"] == 2 and line["params_vs_full"] <= 0.25
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["config"]["embedding"] == "hash"
    main(["train-cf", "--data", str(data), "--embedding", "recjpq", "--codes", "spectral", "--splits", "2",
          "--num-codes", "4", "--dim", "8", "--epochs", "1", "--batch-size", "64", "--out", str(tmp_path / "pq"),
          "--no-progress"])
    config = json.loads((tmp_path / "pq" / "metrics.json").read_text())["config"]
    assert (config["embedding"], config["codes"], config["splits"], config["num_codes"]) == ("recjpq", "spectral", 2, 4)
    with pytest.raises(SystemExit, match="train.txt"):
        main(["train-cf", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])


def test_build_tables_reuse_cached_ids_only_for_the_same_configuration(tmp_path, monkeypatch):
    import recjpq.codes.baco as baco

    data = load_cf(str(write_split(tmp_path)))
    cache = str(tmp_path / "ids.pt")
    config = CFConfig(embedding="baco", dim=8, budget=0.25, tables=2, baco_sweeps=2)
    users, items = build_tables(config, data, cache)

    def fail(*args, **kwargs):
        raise AssertionError("co-clustered again despite cached ids")

    monkeypatch.setattr(baco, "level_codes", fail)
    again_users, again_items = build_tables(config, data, cache)
    assert torch.equal(again_users.rows, users.rows) and torch.equal(again_items.rows, items.rows)
    with pytest.raises(AssertionError, match="co-clustered again"):  # another seed: other ids
        build_tables(CFConfig(embedding="baco", dim=8, budget=0.25, tables=2, baco_sweeps=2, seed=1), data, cache)
    moved = copy.copy(data)  # the same sizes, one training pair moved to another item: other ids
    moved.train_items = data.train_items.copy()
    moved.train_items[0] = (moved.train_items[0] + 1) % data.num_items
    with pytest.raises(AssertionError, match="co-clustered again"):
        build_tables(config, moved, cache)
    hashed = build_tables(CFConfig(embedding="hash", dim=8, budget=0.25, tables=2), data, cache)
    assert not torch.equal(hashed[0].rows, users.rows)  # the cache now holds the hash ids
    assert torch.load(cache, weights_only=True)["key"]["embedding"] == "hash"


def test_build_tables_reuse_cached_recjpq_codes_only_for_the_same_codes(tmp_path, monkeypatch):
    import recjpq.codes as codes_lib

    data = load_cf(str(write_split(tmp_path)))
    cache = str(tmp_path / "ids.pt")
    config = CFConfig(embedding="recjpq", codes="baco", splits=2, num_codes=4, dim=8)
    _, items = build_tables(config, data, cache)

    def fail(*args, **kwargs):
        raise AssertionError("codes assigned again despite cached ones")

    monkeypatch.setattr(codes_lib, "assign_codes", fail)
    _, again = build_tables(config, data, cache)
    assert torch.equal(again.codes, items.codes)
    for other in ({"codes": "svd"}, {"splits": 4}, {"num_codes": 8}, {"seed": 1}):
        with pytest.raises(AssertionError, match="assigned again"):
            build_tables(CFConfig(**{**vars(config), **other}), data, cache)


def test_lightgcn_moves_its_adjacency_with_the_tables(tmp_path):
    data = load_cf(str(write_split(tmp_path)))
    config = CFConfig(model="lightgcn", dim=4, layers=2)
    from recjpq.cf.train import _build_model

    model = _build_model(config, data, build_tables(config, data)).double()
    assert model.adjacency.dtype == torch.float64 and model.adjacency.layout == torch.sparse_csr
    users, items = model.embeddings()
    assert users.dtype == torch.float64 and users.shape == (data.num_users, 4)
    assert "adjacency" not in model.state_dict()  # rebuilt from the data, not saved


def test_config_rejects_an_unknown_device():
    with pytest.raises(ValueError, match="device"):
        CFConfig(device="gpu0").validate()


def test_user_sampler_weighs_users_equally_and_draws_their_own_items():
    from recjpq.cf.train import _epoch_pairs

    # user 0 has 90 training items, user 2 has 10, user 1 none (it must never be drawn)
    users = torch.tensor([0] * 90 + [2] * 10)
    items = torch.cat([torch.arange(90), torch.arange(90, 100)])
    g = torch.Generator().manual_seed(0)
    drawn_users, drawn_items = [], []
    for _ in range(50):
        u, i = _epoch_pairs(users, items, 3, "users", g)
        assert u.shape == users.shape == i.shape
        drawn_users.append(u)
        drawn_items.append(i)
    u, i = torch.cat(drawn_users), torch.cat(drawn_items)
    assert set(u.unique().tolist()) == {0, 2}
    assert 0.45 < (u == 2).float().mean() < 0.55  # 5,000 draws: user 2 holds half, not a tenth
    assert bool(((u == 0) == (i < 90)).all())  # each positive is the drawn user's own item
    assert set(i[u == 2].tolist()) == set(range(90, 100)) and len(set(i[u == 0].tolist())) == 90
    pairs_u, pairs_i = _epoch_pairs(users, items, 3, "pairs", g)
    assert sorted(zip(pairs_u.tolist(), pairs_i.tolist())) == sorted(zip(users.tolist(), items.tolist()))
