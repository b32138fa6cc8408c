"""recjpq.convert: PQ of trained item tables (k-means, SVD, OPQ), PQEmbedding.from_dense, finetune."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from recjpq.convert import (RotatedPQEmbedding, distill, distillation_loss, finetune, quantize, query_metric,
                            training_queries, valid_num_splits)
from recjpq.models import SASRec
from recjpq.nn import PQEmbedding
from recjpq.patch import patch_item_scoring
from sasrec_pytorch_style import SASRecPytorchStyle


def decode(codes, centroids, rotation=None):
    x = centroids[torch.arange(centroids.shape[0]), codes.long()].flatten(1)
    return x if rotation is None else x @ rotation.T


def clustered(num_clusters=60, per_cluster=10, dim=32, spread=0.02, seed=0):
    """Items in tight, well-separated clusters (centres on a sphere of radius 4)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(num_clusters, dim, generator=g), dim=1) * 4
    labels = torch.arange(num_clusters).repeat_interleave(per_cluster)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


def neighbour_recall(reference, approx, k=10):
    """Mean overlap of each row's k nearest rows (squared L2) under the two tables."""
    def knn(x):
        return torch.cdist(x, x).topk(k, dim=1, largest=False).indices
    a, b = knn(reference), knn(approx)
    return sum(len(set(r.tolist()) & set(s.tolist())) for r, s in zip(a, b)) / (k * len(a))


@pytest.mark.parametrize("method,rotate", [("kmeans", False), ("kmeans", True), ("svd", False)])
def test_clustered_top10_neighbours_recovered(method, rotate):
    weight, labels = clustered()
    out = quantize(weight, num_splits=8, num_codes=256, method=method, rotate=rotate, iters=10, opq_iters=3)
    approx = decode(*out)
    assert neighbour_recall(weight, approx) >= 0.98
    # each item's 10 nearest reconstructed items are its own cluster
    nearest = torch.cdist(approx, approx).topk(10, dim=1, largest=False).indices
    assert (labels[nearest] == labels[:, None]).float().mean() >= 0.98


def test_inner_product_top10_of_cluster_queries():
    weight, labels = clustered(per_cluster=10)
    codes, centroids = quantize(weight, 8, iters=10)
    queries = weight[::10] + 0.01  # one per cluster: its top-10 by inner product is the cluster
    dense = (queries @ weight.T).topk(10).indices
    pq = (queries @ decode(codes, centroids).T).topk(10).indices
    assert all(set(a.tolist()) == set(b.tolist()) for a, b in zip(dense, pq))


def test_outputs_shapes_dtypes_and_determinism():
    weight = torch.randn(301, 12)
    codes, centroids = quantize(weight, 3, 16, iters=3, seed=1)
    assert codes.shape == (301, 3) and codes.dtype == torch.uint8 and codes.is_contiguous()
    assert centroids.shape == (3, 16, 4) and centroids.dtype == torch.float32
    assert int(codes.max()) < 16
    again = quantize(weight, 3, 16, iters=3, seed=1)
    assert torch.equal(codes, again[0]) and torch.equal(centroids, again[1])
    wide, _ = quantize(torch.randn(700, 4), 2, 300, iters=2)
    assert wide.dtype == torch.int16 and int(wide.max()) < 300


def test_kmeans_beats_one_shot_svd_and_lowers_with_iters():
    weight = torch.randn(2000, 16, generator=torch.Generator().manual_seed(3))

    def error(**kw):
        return float((decode(*quantize(weight, 4, 32, **kw)) - weight).square().mean())
    assert error(method="kmeans", iters=20) < error(method="kmeans", iters=1)
    assert error(method="kmeans", iters=20) < error(method="svd")


def test_rotation_is_orthogonal_and_helps_unbalanced_subspaces():
    # all the variance sits in the first split's coordinates: OPQ spreads it over the splits
    g = torch.Generator().manual_seed(4)
    scales = torch.tensor([8.0, 6.0, 5.0, 4.0] + [0.1] * 12)
    weight = torch.randn(1500, 16, generator=g) * scales
    codes, centroids, rotation = quantize(weight, 4, 16, rotate=True, iters=10, opq_iters=5)
    assert torch.allclose(rotation @ rotation.T, torch.eye(16), atol=1e-4)
    plain = float((decode(*quantize(weight, 4, 16, iters=10)) - weight).square().mean())
    rotated = float((decode(codes, centroids, rotation) - weight).square().mean())
    assert rotated < 0.8 * plain


def anisotropic_queries(n, dim=16, seed=0):
    """Queries that live mostly in 3 directions (as a trained encoder's states do)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=torch.Generator().manual_seed(99)))[0]
    scales = torch.tensor([6.0, 4.0, 3.0] + [0.2] * (dim - 3))
    return (torch.randn(n, dim, generator=g) * scales) @ basis.T


def test_query_metric_lowers_the_score_error_on_the_queries():
    """The metric trades reconstruction error in directions the queries ignore for score error
    where they look: on held-out queries of the same distribution it beats plain k-means and OPQ."""
    weight = torch.randn(1200, 16, generator=torch.Generator().manual_seed(7))
    queries, held_out = anisotropic_queries(3000), anisotropic_queries(500, seed=1)
    metric = query_metric(queries)
    assert torch.allclose(metric, queries.T @ queries / len(queries), rtol=1e-4, atol=1e-4)

    def score_error(out):
        table = decode(*out)
        return float((held_out @ (table - weight).T).square().mean())
    plain = score_error(quantize(weight, 4, 16, iters=10))
    opq = score_error(quantize(weight, 4, 16, iters=10, rotate=True, opq_iters=5))
    out = quantize(weight, 4, 16, iters=10, rotate=True, opq_iters=5, metric=metric)
    assert len(out) == 3 and not torch.allclose(out[2] @ out[2].T, torch.eye(16), atol=1e-2)  # not orthogonal
    assert score_error(out) < 0.7 * min(plain, opq)
    # the identity metric is plain k-means up to the (identity) rotation
    same = quantize(weight, 4, 16, iters=10, metric=torch.eye(16))
    assert torch.allclose(same[2], torch.eye(16), atol=1e-5)
    assert torch.allclose(decode(*same), decode(*quantize(weight, 4, 16, iters=10)), atol=1e-4)


def test_query_metric_table_scores_and_ranks_as_its_decoded_items():
    weight = torch.randn(300, 16, generator=torch.Generator().manual_seed(8))
    weight[0] = 0
    dense = nn.Embedding.from_pretrained(weight, freeze=False, padding_idx=0)
    pq = PQEmbedding.from_dense(dense, 4, 16, iters=5, rotate=True, opq_iters=2,
                                metric=query_metric(anisotropic_queries(800)))
    assert isinstance(pq, RotatedPQEmbedding)
    q = anisotropic_queries(6, seed=2)
    table = pq.weight
    assert torch.equal(table[0], torch.zeros(16))  # the padding row still embeds to zeros
    scores = (q @ table.T).index_fill(1, torch.tensor([0]), 0.0)
    assert torch.allclose(pq.score_all(q), scores, atol=1e-3)
    assert torch.allclose(pq.score(q, torch.tensor([3, 7, 0])), scores[:, [3, 7, 0]], atol=1e-3)
    values, ids = pq.topk(q, 8)
    masked = scores.index_fill(1, torch.tensor([0]), float("-inf"))
    assert torch.allclose(values, masked.topk(8).values, atol=1e-3)
    assert torch.allclose(torch.gather(masked, 1, ids), values, atol=1e-3)


@pytest.mark.parametrize("metric,match", [
    (torch.eye(8), "metric must be"), (torch.ones(16, 16).triu(), "symmetric"),
    (-torch.eye(16), "positive semi-definite"), (torch.full((16, 16), float("nan")), "finite"),
    ("queries", "metric must be")])
def test_bad_metric(metric, match):
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(50, 16), 4, 8, metric=metric)


def test_padding_row_left_out_of_the_fit():
    weight, _ = clustered(num_clusters=20, per_cluster=5)
    weight = torch.cat([torch.zeros(1, weight.shape[1]), weight])
    codes, centroids = quantize(weight, 4, 32, iters=5, padding_idx=0)
    assert codes.shape[0] == 101
    # no centroid was spent on the zero row: none of them sits at the origin
    assert float(centroids.norm(dim=-1).min()) > 0.5


def near_duplicates(groups=20, copies=5, dim=8, seed=0):
    """A padding row of zeros, then ``groups`` x ``copies`` items that are all but identical."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(groups, dim, generator=g).repeat_interleave(copies, 0)
    return torch.cat([torch.zeros(1, dim), base + 1e-4 * torch.randn(len(base), dim, generator=g)])


@pytest.mark.parametrize("rotate", [False, True])
def test_unique_code_rows(rotate):
    weight = near_duplicates()
    plain = quantize(weight, 2, 16, iters=5, padding_idx=0, unique=False, rotate=rotate, opq_iters=2)
    assert len(torch.unique(plain[0][1:], dim=0)) < 100  # copies share their nearest centroids
    out = quantize(weight, 2, 16, iters=5, padding_idx=0, rotate=rotate, opq_iters=2)
    assert len(torch.unique(out[0][1:], dim=0)) == 100
    # a moved item changes one split, to a centroid near its own
    changed = (out[0] != plain[0]).sum(1)
    assert int(changed.max()) == 1
    assert torch.equal(out[1], plain[1])  # centroids untouched


def test_unique_code_rows_at_and_past_capacity():
    weight = near_duplicates()
    full, _ = quantize(weight, 2, 10, iters=5, padding_idx=0)  # K^M = 100 rows for 100 items
    assert len(torch.unique(full[1:], dim=0)) == 100
    few, _ = quantize(weight, 2, 8, iters=5, padding_idx=0)  # 64 rows for 100 items: sharing is unavoidable
    assert int(few.max()) < 8 and len(torch.unique(few[1:], dim=0)) <= 64


def test_divisibility_error_lists_valid_splits():
    assert valid_num_splits(50) == [1, 2, 5, 10, 25, 50]
    with pytest.raises(ValueError, match=r"valid num_splits for d=50: 1, 2, 5, 10, 25, 50$"):
        quantize(torch.randn(10, 50), 8)
    with pytest.raises(ValueError, match=r"d=50: 1, 2, 5, 10, 25, 50"):
        patch_item_scoring(SASRecPytorchStyle(30, 50, 4), 16)


@pytest.mark.parametrize("alpha,temperature,chunk", [(0.5, 1.0, 7), (0.3, 2.0, 64), (1.0, 0.5, 10), (0.0, 1.0, 3)])
def test_distillation_loss_matches_materialised(alpha, temperature, chunk):
    g = torch.Generator().manual_seed(6)
    h = torch.randn(9, 8, generator=g, requires_grad=True)
    weight = torch.randn(53, 8, generator=g, requires_grad=True)
    teacher_h, teacher_weight = torch.randn(9, 8, generator=g), torch.randn(53, 8, generator=g)
    targets = torch.randint(0, 53, (9,), generator=g)
    loss = distillation_loss(h, weight, teacher_h, teacher_weight, targets, alpha=alpha, temperature=temperature,
                             chunk=chunk)
    z, zt = h @ weight.T, teacher_h @ teacher_weight.T
    kl = nn.functional.kl_div(nn.functional.log_softmax(z / temperature, 1),
                              nn.functional.log_softmax(zt / temperature, 1), log_target=True, reduction="batchmean")
    expected = (1 - alpha) * nn.functional.cross_entropy(z, targets) + alpha * temperature ** 2 * kl
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(torch.autograd.grad(loss, (h, weight)), torch.autograd.grad(expected, (h, weight))):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_distillation_loss_gradcheck():
    g = torch.Generator().manual_seed(7)
    h = torch.randn(4, 6, generator=g, dtype=torch.float64)
    weight = torch.randn(11, 6, generator=g, dtype=torch.float64)
    teacher_h, teacher_weight = torch.randn(4, 6, generator=g), torch.randn(11, 6, generator=g)
    targets = torch.tensor([0, 10, 3, 3])
    from recjpq.convert import _DistillLoss
    assert torch.autograd.gradcheck(
        lambda a, b: _DistillLoss.apply(a, b, teacher_h.double(), teacher_weight.double(), targets, 0.4, 1.5, 4),
        (h.requires_grad_(), weight.requires_grad_()))


def test_distillation_loss_bad_arguments():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="targets"):
        distillation_loss(h, w, h, w, torch.tensor([0, 1, 5]))
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(h, w, h, w, torch.tensor([0, 1, 2]), alpha=1.5)
    with pytest.raises(ValueError, match="teacher"):
        distillation_loss(h, w, h[:2], w, torch.tensor([0, 1, 2]))


NUM_ITEMS, MAX_LEN = 60, 8


def sequences(num=48, seed=0):
    """Users walking the catalogue in steps of 1-3 items: a pattern a tiny model learns."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        start, steps = rng.integers(1, NUM_ITEMS + 1), rng.integers(1, 4, size=int(rng.integers(4, 12)))
        out.append((start + np.concatenate([[0], np.cumsum(steps)]) - 1) % NUM_ITEMS + 1)
    return out


def teacher_agreement(student_scores, teacher_scores):
    """KL(teacher || student) of the softmax over the real items (padding column dropped)."""
    return float(nn.functional.kl_div(nn.functional.log_softmax(student_scores[:, 1:], 1),
                                      nn.functional.log_softmax(teacher_scores[:, 1:], 1),
                                      log_target=True, reduction="batchmean"))


def trained_dense_sasrec(seed=0):
    """30 full-batch CE steps of a tiny dense SASRec on ``sequences()``: a teacher with opinions."""
    from recjpq.data import pad_left
    from recjpq.training import TrainConfig, training_loss

    torch.manual_seed(seed)
    model = SASRec(NUM_ITEMS, 16, num_layers=1, max_len=MAX_LEN, dropout=0.0)
    data = sequences()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    seqs, config, rng = pad_left(data, MAX_LEN + 1), TrainConfig(loss="ce"), np.random.default_rng(seed)
    for _ in range(30):
        optimizer.zero_grad()
        training_loss(model, seqs, config, rng, torch.Generator()).backward()
        optimizer.step()
    return model.eval(), data


@pytest.mark.parametrize("train_encoder", [False, True])
def test_distill_recjpq_model_moves_towards_teacher(train_encoder):
    import copy

    from recjpq.data import pad_left
    dense, data = trained_dense_sasrec()
    queries = pad_left(data, MAX_LEN)
    with torch.no_grad():
        teacher_scores = dense.scorer.all(dense.query(queries))
    quantized = copy.deepcopy(dense)
    patch_item_scoring(quantized, 4, 8, iters=5, seed=0)
    model = copy.deepcopy(dense)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    calls = []
    result = distill(model, data, 4, 8, steps=40, batch_size=16, lr=3e-2, alpha=1.0, iters=5,
                     train_encoder=train_encoder, encoder_lr=3e-3, callback=lambda s, t: calls.append((s, t)),
                     callback_every=15, progress=False)
    assert result.steps == 40 and len(result.losses) == 40 and result.seconds > 0
    assert [c[0] for c in calls] == [0, 15, 30, 40] and calls[-1][1] == pytest.approx(result.seconds)
    assert 0 < result.quantize_seconds <= calls[0][1] <= calls[1][1]  # the clock starts before quantising
    assert isinstance(model.item_embedding, PQEmbedding) and model.item_embedding is result.embedding
    assert torch.equal(model.item_embedding.codes, quantized.item_embedding.codes)  # codes fixed
    assert not model.training and all(p.requires_grad for p in model.parameters())
    moved = any(not torch.equal(v, model.encoder.state_dict()[k]) for k, v in encoder_before.items())
    assert moved == train_encoder
    with torch.no_grad():
        before = teacher_agreement(quantized.scorer.all(quantized.query(queries)), teacher_scores)
        after = teacher_agreement(model.scorer.all(model.query(queries)), teacher_scores)
    # K = 8 sub-items per split bound how close the codes can get (0.395 -> 0.356 converged, frozen)
    assert after < (0.85 if train_encoder else 0.95) * before


def test_distill_sasrec_pytorch_style_and_time_limit():
    import copy

    from recjpq.data import pad_left
    torch.manual_seed(1)
    dense = SASRecPytorchStyle(NUM_ITEMS, 8, MAX_LEN).eval()
    data = sequences(seed=1)
    log_seqs = pad_left(data, MAX_LEN).numpy()
    with torch.no_grad():
        teacher_scores = dense.log2feats(log_seqs)[:, -1] @ dense.item_emb.weight.T
    quantized = copy.deepcopy(dense)
    patch_item_scoring(quantized, 2, 8, iters=5)
    model = copy.deepcopy(dense)
    with pytest.raises(ValueError, match="max_len"):
        distill(model, data, 2, 8, steps=1)
    assert type(model.item_emb) is nn.Embedding  # refused before anything changed
    cpu_before = time.process_time()
    result = distill(model, data, 2, 8, max_len=MAX_LEN, time_limit=0.5, clock="cpu", batch_size=8, lr=1e-2,
                     alpha=1.0, iters=5, progress=False)
    assert time.process_time() - cpu_before >= 0.5
    assert result.seconds >= 0.5 and result.steps >= 1
    values, ids = model.predict_topk(None, log_seqs, 5)
    with torch.no_grad():
        after = model.log2feats(log_seqs)[:, -1] @ model.item_emb.weight.T
        before = quantized.log2feats(log_seqs)[:, -1] @ quantized.item_emb.weight.T
        assert torch.allclose(values, after.index_fill(1, torch.tensor([0]), float("-inf")).topk(5).values, atol=1e-4)
    assert teacher_agreement(after, teacher_scores) < teacher_agreement(before, teacher_scores)


def test_distill_query_metric_quantises_for_the_teachers_queries():
    """metric="queries": the table right after quantising (callback at step 0) scores the teacher's
    own queries closer to the teacher than the OPQ table does, and still distils."""
    import copy

    from recjpq.data import pad_left
    dense, data = trained_dense_sasrec()
    with torch.no_grad():
        queries = dense.query(pad_left(data, MAX_LEN))
        teacher_scores = queries @ dense.item_embedding.weight[1:].T

    def quantised_score_error(**kw):
        model, errors = copy.deepcopy(dense), []

        def at_step_0(step, seconds):
            if step == 0:
                with torch.no_grad():
                    errors.append(float((queries @ model.item_embedding.weight[1:].T - teacher_scores).square().mean()))
        result = distill(model, data, 4, 16, steps=3, batch_size=16, iters=5, rotate=True, opq_iters=3,
                         callback=at_step_0, progress=False, **kw)
        return errors[0], model, result
    opq, _, _ = quantised_score_error()
    error, model, result = quantised_score_error(metric="queries", metric_sequences=32)
    rotation = model.item_embedding.rotation
    assert isinstance(model.item_embedding, RotatedPQEmbedding) and result.steps == 3
    assert not torch.allclose(rotation @ rotation.T, torch.eye(16), atol=1e-2)
    assert error < opq
    # the metric is that of the teacher's states at the training positions
    by_hand = copy.deepcopy(dense)
    patch_item_scoring(by_hand, 4, 16, iters=5, rotate=True, opq_iters=3,
                       metric=query_metric(training_queries(dense, data, num_sequences=32)))
    assert torch.equal(by_hand.item_embedding.codes, model.item_embedding.codes)
    assert torch.allclose(by_hand.item_embedding.rotation, rotation)
    with pytest.raises(ValueError, match="metric"):
        distill(copy.deepcopy(dense), data, 4, 16, steps=1, metric="items")


@pytest.mark.parametrize("kind", ["plain", "metric"])
def test_reassigned_codes_reconstruct_the_teacher_better_and_stay_unique(kind):
    """After the sub-items moved (as in training), reassignment never raises the teacher's
    reconstruction error in the quantiser's metric (total), and no two items share a row."""
    from recjpq.convert import _reassign_codes
    weight = torch.randn(400, 16, generator=torch.Generator().manual_seed(9))
    weight[0] = 0
    metric = query_metric(anisotropic_queries(800)) if kind == "metric" else None
    pq = PQEmbedding.from_dense(nn.Embedding.from_pretrained(weight, padding_idx=0), 4, 8, iters=5,
                                metric=metric, rotate=kind == "metric", opq_iters=2)
    with torch.no_grad():
        pq.subitem_embeddings.add_(0.3 * torch.randn(pq.subitem_embeddings.shape,
                                                     generator=torch.Generator().manual_seed(1)))
    weigh = torch.eye(16) if metric is None else metric

    def error():
        delta = (pq.weight - weight)[1:].detach()
        return float(torch.einsum("nd,de,ne->", delta, weigh, delta))
    before, codes_before = error(), pq.codes.clone()
    changed = _reassign_codes(pq, weight, torch.Generator().manual_seed(0))
    assert changed == int((pq.codes != codes_before).any(1).sum()) > 0
    assert error() < before
    assert torch.equal(pq.codes[0], codes_before[0]) and len(torch.unique(pq.codes[1:], dim=0)) == 399


def test_distill_reassigns_codes_on_schedule():
    import copy

    dense, data = trained_dense_sasrec()
    model = copy.deepcopy(dense)
    result = distill(model, data, 4, 8, steps=6, batch_size=16, iters=5, reassign_every=2, progress=False)
    assert len(result.reassigned) == 3 and all(0 <= n <= NUM_ITEMS for n in result.reassigned)
    assert len(torch.unique(model.item_embedding.codes[1:], dim=0)) == NUM_ITEMS
    with pytest.raises(ValueError, match="reassign_every"):
        distill(copy.deepcopy(dense), data, 4, 8, steps=1, reassign_every=0)


def test_training_queries_are_the_states_at_positions_with_a_next_item():
    from recjpq.data import pad_left
    dense, data = trained_dense_sasrec()
    dense.train()
    # batches of one: no padding column (a padded batch also has the position before the first
    # item, which predicts it, as in training)
    queries = training_queries(dense, data, num_sequences=1000, batch_size=1)
    assert dense.training  # evaluated in eval mode, mode restored
    lengths = [min(len(s) - 1, MAX_LEN) for s in data]  # every position but the last predicts a next item
    assert queries.shape == (sum(lengths), 16) and not queries.requires_grad
    one = training_queries(dense, data[:1], batch_size=1)
    with torch.no_grad():
        states = dense.eval().encode(pad_left([data[0][-MAX_LEN - 1:-1]], MAX_LEN))[0, -lengths[0]:]
    assert torch.allclose(one, states, atol=1e-5)
    with pytest.raises(ValueError, match="two or more"):
        training_queries(dense, [np.array([4])])


def test_distill_refuses():
    from test_patch import RecBoleStyle

    with pytest.raises(ValueError, match="RecBole"):
        distill(RecBoleStyle(20, 8), sequences(), 2, 8)
    dense, data = trained_dense_sasrec()
    with pytest.raises(ValueError, match="two or more"):
        distill(dense, [np.array([3])], 2, 8)
    with pytest.raises(ValueError, match="time_limit"):
        distill(dense, data, 2, 8, time_limit=0)
    with pytest.raises(ValueError, match="clock"):
        distill(dense, data, 2, 8, time_limit=1, clock="gpu")
    assert type(dense.item_embedding) is nn.Embedding


@pytest.mark.parametrize("kw,err", [
    (dict(num_splits=5), ValueError), (dict(num_splits=0), ValueError), (dict(num_codes=0), ValueError),
    (dict(method="opq"), ValueError), (dict(iters=0), ValueError), (dict(padding_idx=40), ValueError),
    (dict(train_size=0), ValueError)])
def test_bad_arguments(kw, err):
    args = dict(num_splits=4)
    args.update(kw)
    with pytest.raises(err):
        quantize(torch.randn(40, 8), **args)


def test_bad_weight():
    with pytest.raises(TypeError, match="weight"):
        quantize([[1.0, 2.0]], 1)
    with pytest.raises(TypeError, match="floating"):
        quantize(torch.ones(4, 4, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="weight"):
        quantize(torch.randn(4), 2)
    with pytest.raises(ValueError, match="non-finite"):
        quantize(torch.tensor([[1.0, float("nan")]]), 1)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 80), m=st.sampled_from([1, 2, 3]), dsub=st.integers(1, 3), k=st.integers(1, 40),
       method=st.sampled_from(["kmeans", "svd"]), seed=st.integers(0, 3))
def test_fuzz_valid_codes_and_exact_when_k_covers_n(n, m, dsub, k, method, seed):
    weight = torch.randn(n, m * dsub, generator=torch.Generator().manual_seed(seed))
    codes, centroids = quantize(weight, m, k, method=method, iters=3, seed=seed)
    assert codes.shape == (n, m) and centroids.shape == (m, k, dsub)
    assert 0 <= int(codes.min()) and int(codes.max()) < k
    assert torch.isfinite(centroids).all()
    # one centroid per row is reachable when k >= n: k-means++ seeds on the rows. Rows of one split
    # closer than ~1e-3 can share a centroid (squared distances by expansion carry float32 error
    # of that size), and unique code rows then move one of them: the claim is for separated rows.
    gaps = torch.cdist(weight.view(n, m, dsub).transpose(0, 1), weight.view(n, m, dsub).transpose(0, 1))
    separated = n == 1 or bool((gaps + torch.eye(n) * 1e9).amin() > 0.05)
    if method == "kmeans" and k >= n and separated:
        assert torch.allclose(decode(codes, centroids), weight, atol=1e-3)


def test_from_dense_keeps_ids_padding_and_scores():
    weight, _ = clustered(num_clusters=30, per_cluster=10, dim=16)
    dense = nn.Embedding(301, 16, padding_idx=0)
    with torch.no_grad():
        dense.weight[1:] = weight
        dense.weight[0] = 0
    # unique=False: items of a tight cluster may share codes (unique rows would move some of them
    # to a neighbouring centroid, test_unique_code_rows)
    pq = PQEmbedding.from_dense(dense, 4, 64, iters=10, unique=False)
    assert type(pq) is PQEmbedding and pq.padding_idx == 0 and pq.num_embeddings == 301
    assert torch.allclose(pq.weight[1:], weight, atol=0.1)
    assert torch.equal(pq.weight[0], torch.zeros(16))
    q = torch.randn(4, 16)
    values, ids = pq.topk(q, 5)
    by_hand = (q @ pq.weight.T).index_fill(1, torch.tensor([0]), float("-inf"))
    assert (ids != 0).all()
    assert torch.allclose(values, by_hand.topk(5).values, atol=1e-4)  # items sharing codes tie exactly
    assert torch.allclose(torch.gather(by_hand, 1, ids), values, atol=1e-4)


def test_from_dense_rotated():
    dense = torch.randn(200, 8) * torch.tensor([5.0, 4, 3, 2, 0.1, 0.1, 0.1, 0.1])
    pq = PQEmbedding.from_dense(dense, 2, 16, rotate=True, iters=5, opq_iters=3)
    assert isinstance(pq, RotatedPQEmbedding) and pq.padding_idx is None
    q = torch.randn(3, 8)
    table = pq.weight  # decoded and rotated back
    assert torch.allclose(pq.score_all(q), q @ table.T, atol=1e-4)
    assert torch.allclose(pq.score(q, torch.tensor([3, 7])), (q @ table[[3, 7]].T), atol=1e-4)
    values, ids = pq.topk(q, 6)
    assert torch.allclose(values, (q @ table.T).topk(6).values, atol=1e-4)  # items sharing codes tie
    assert torch.allclose(torch.gather(q @ table.T, 1, ids), values, atol=1e-4)
    with pytest.raises(TypeError, match="embedding"):
        PQEmbedding.from_dense("table", 2)


def test_finetune_trains_subitems_only():
    g = torch.Generator().manual_seed(5)
    target_table = torch.randn(120, 8, generator=g)
    pq = PQEmbedding.from_dense(target_table, 2, 8, iters=3)
    codes = pq.codes.clone()
    other = nn.Parameter(torch.ones(8))
    queries = torch.randn(64, 8, generator=g)

    def loss_fn():  # distil the dense scores, through a parameter that must stay put
        return (pq.score_all(queries * other) - queries @ target_table.T).square().mean()
    losses = finetune(pq, loss_fn, 30, lr=0.05)
    assert losses[-1] < losses[0]
    assert torch.equal(pq.codes, codes) and torch.equal(other.detach(), torch.ones(8)) and other.grad is None
    with pytest.raises(TypeError, match="PQEmbedding"):
        finetune(nn.Embedding(3, 2), loss_fn, 1)
    with pytest.raises(ValueError, match="steps"):
        finetune(pq, loss_fn, 0)


@pytest.mark.parametrize("flags", [[], ["--rotate"], ["--rotate", "--metric", "queries"]])
def test_cli_convert_writes_a_checkpoint_recjpq_can_load(tmp_path, flags):
    import json

    from recjpq.checkpoint import load_checkpoint, save_checkpoint
    from recjpq.cli import main
    from recjpq.data import load_interactions

    path = tmp_path / "data.txt"
    path.write_text("".join(f"u{u} i{item}\n" for u, seq in enumerate(sequences()) for item in seq))
    data = load_interactions(str(path))
    torch.manual_seed(0)
    dense = SASRec(data.num_items, 16, num_layers=1, max_len=MAX_LEN).eval()
    save_checkpoint(tmp_path / "dense.pt", dense, {"item_ids": data.item_ids})
    out = tmp_path / "out"
    args = ["convert", str(tmp_path / "dense.pt"), "--data", str(path), "--splits", "4", "--num-codes", "8",
            "--steps", "3", "--batch-size", "8", "--out", str(out), "--no-progress"] + flags
    main(args)
    model, meta = load_checkpoint(out / "model.pt")  # what recjpq evaluate / recommend / serve read
    assert isinstance(model.item_embedding, PQEmbedding) and model.item_embedding.num_splits == 4
    assert hasattr(model.item_embedding, "rotation") == bool(flags)
    if "--metric" in flags:  # a query metric's rotation is not orthogonal: saved and restored as it is
        rotation = model.item_embedding.rotation
        assert not torch.allclose(rotation @ rotation.T, torch.eye(16), atol=1e-2)
    assert meta["item_ids"] == data.item_ids and meta["conversion"]["steps"] == 3
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["dense"]) == {"ndcg@10", "recall@10"} and set(metrics["converted"]) == {"ndcg@10", "recall@10"}
    assert metrics["item_table_bytes"] < metrics["dense_item_table_bytes"]
    assert model.recommend([[1, 2, 3]], k=5)[1].shape == (1, 5)
    (tmp_path / "other.txt").write_text("u1 x1\nu1 x2\nu1 x3\n")
    with pytest.raises(SystemExit, match="item catalogue"):
        main(["convert", str(tmp_path / "dense.pt"), "--data", str(tmp_path / "other.txt"), "--splits", "4",
              "--out", str(out)])


@pytest.mark.parametrize("name", ["bert4rec", "gru4rec"])
def test_distill_our_other_models(name):
    from recjpq.models import build_model

    torch.manual_seed(0)
    model = build_model(name, NUM_ITEMS, dim=16, num_layers=1, max_len=MAX_LEN).eval()
    result = distill(model, sequences(), 4, 8, steps=3, batch_size=16, iters=3, progress=False)
    assert result.steps == 3 and all(np.isfinite(result.losses))
    assert isinstance(model.item_embedding, PQEmbedding) and model.config["item_embedding"] == "recjpq"
    values, ids = model.recommend([[1, 2, 3]], k=5)
    assert ids.shape == (1, 5) and (ids > 0).all()
