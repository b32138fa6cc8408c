"""Models and losses: the RecJPQ paths must equal the decoded-table computation they avoid."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from recjpq.codes import assign_codes
from recjpq.data import EvalSet, pad_left
from recjpq.evaluation import evaluate, target_ranks
from recjpq.models import EMBEDDINGS, MODELS, build_model, gbce, sampled_bce, softmax_cross_entropy

NUM_ITEMS = 37  # not a multiple of anything; vocab 38 with padding


def _model(name, embedding, seed=0, **kw):
    torch.manual_seed(seed)
    codes = assign_codes(None, NUM_ITEMS + 1, 3, 5, strategy="random", seed=seed) if embedding == "recjpq" else None
    return build_model(name, NUM_ITEMS, codes=codes, dim=12, item_embedding=embedding, num_codes=5,
                       max_len=9, **kw).eval()


def _seqs(batch=4, length=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(1, NUM_ITEMS + 1, (batch, length), generator=g)
    seqs[0, :6] = 0
    seqs[1, :2] = 0
    return seqs


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_shapes_padding_and_batch_independence(name, embedding):
    model = _model(name, embedding)
    seqs = _seqs()
    h = model.encode(seqs)
    assert h.shape == (4, 9, 12)
    assert torch.all(h[0, :6] == 0)  # padding positions carry nothing
    q = model.query(seqs)
    assert q.shape == (4, 12) and torch.isfinite(q).all()
    torch.testing.assert_close(model.query(seqs[1:2]), q[1:2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_padding_invariant_flag_matches_behaviour(name):
    """Models that declare ``padding_invariant`` give the same outputs at the real positions
    however far a batch is left-padded (training pads each batch only to its longest sequence);
    GRU4Rec, whose state runs through the padding, must not declare it."""
    model = _model(name, "recjpq")
    short = _seqs(batch=3, length=7, seed=1)  # rows with 1, 5 and 7 real items
    seqs = torch.cat([torch.zeros(3, 2, dtype=short.dtype), short], 1)  # the same rows, 2 more pads
    same = torch.allclose(model.encode(seqs)[:, 2:], model.encode(short), rtol=1e-5, atol=1e-6)
    assert same == model.padding_invariant == (name != "gru4rec")
    rows = [np.arange(1, 4), np.arange(1, 7)]
    assert model.batch_width(rows, 9) == (6 if model.padding_invariant else 9)
    assert model.batch_width(rows, 5) == 5


@pytest.mark.parametrize("name", list(MODELS))
def test_recjpq_scores_match_decoded_table(name):
    model = _model(name, "recjpq")
    q = model.query(_seqs())
    decoded = q @ model.item_embedding.weight.t()
    torch.testing.assert_close(model.scorer.all(q), decoded, rtol=1e-5, atol=1e-5)
    ids = torch.randint(0, NUM_ITEMS + 1, (4, 6))
    torch.testing.assert_close(model.scorer.items(q, ids), torch.gather(decoded, 1, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_topk_excludes_padding_and_seen_items(embedding):
    model = _model("sasrec", embedding)
    q = model.query(_seqs())
    exclude = torch.tensor([[3, 5, -1], [-1, -1, -1], [1, 2, 3], [7, 7, 7]])
    k = NUM_ITEMS - 3
    values, indices = model.scorer.topk(q, k, exclude)
    scores = q @ model.item_embedding.weight.t()
    scores[:, 0] = float("-inf")
    for b in range(4):
        scores[b, exclude[b][exclude[b] >= 0]] = float("-inf")
    ref = torch.sort(scores, dim=1, descending=True, stable=True)
    torch.testing.assert_close(values, ref.values[:, :k], rtol=1e-5, atol=1e-5)
    assert (indices != 0).all()
    for b in range(4):
        assert not set(indices[b].tolist()) & set(exclude[b].tolist())
    # row 2 has 3 exclusions + padding: the last item slot is empty
    _, full = model.scorer.topk(q, NUM_ITEMS, exclude)
    assert full[2, -3:].tolist() == [-1, -1, -1] and (full[1] > 0).all()


@pytest.mark.parametrize("embedding", EMBEDDINGS)
def test_recommend(embedding):
    model = _model("gru4rec", embedding)
    hist = [[4, 9, 9, 2], [NUM_ITEMS]]
    _, items = model.recommend(hist, 5)
    assert items.shape == (2, 5)
    assert not set(items[0].tolist()) & {4, 9, 2, 0} and NUM_ITEMS not in items[1].tolist()
    _, with_seen = model.recommend(hist, NUM_ITEMS, exclude_seen=False)
    assert sorted(with_seen[0].tolist()) == list(range(1, NUM_ITEMS + 1))
    with pytest.raises(ValueError, match="history item ids"):
        model.recommend([[0, 3]], 5)
    with pytest.raises(ValueError, match="k must be"):
        model.recommend(hist, NUM_ITEMS + 1)


def test_softmax_cross_entropy_through_pq_scores_equals_decoded():
    model = _model("sasrec", "recjpq")
    h = torch.randn(10, 12, requires_grad=True)
    targets = torch.randint(1, NUM_ITEMS + 1, (10,))
    loss = softmax_cross_entropy(model.scorer, h, targets)
    ref = F.cross_entropy(h @ model.item_embedding.weight.t(), targets)
    torch.testing.assert_close(loss, ref)
    g, = torch.autograd.grad(loss, model.item_embedding.subitem_embeddings)
    g_ref, = torch.autograd.grad(ref, model.item_embedding.subitem_embeddings)
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


def test_gbce_reduces_to_bce_and_matches_formula():
    model = _model("sasrec", "dense")
    h = torch.randn(6, 12)
    targets = torch.randint(1, NUM_ITEMS + 1, (6,))
    negatives = torch.randint(1, NUM_ITEMS + 1, (6, 4))
    bce = sampled_bce(model.scorer, h, targets, negatives)
    torch.testing.assert_close(gbce(model.scorer, h, targets, negatives, NUM_ITEMS, t=0.0), bce)
    pos = (h * model.item_embedding.weight[targets]).sum(-1)
    neg = torch.einsum("td,tnd->tn", h, model.item_embedding.weight[negatives])
    alpha = 4 / (NUM_ITEMS - 1)
    beta = alpha * (0.75 * (1 - 1 / alpha) + 1 / alpha)
    ref = (-beta * F.logsigmoid(pos) - F.logsigmoid(-neg).sum(-1)).mean() / 5
    torch.testing.assert_close(gbce(model.scorer, h, targets, negatives, NUM_ITEMS, t=0.75), ref)
    with pytest.raises(ValueError, match="t must be"):
        gbce(model.scorer, h, targets, negatives, NUM_ITEMS, t=2.0)


def test_bert4rec_masking():
    model = _model("bert4rec", "dense", mask_prob=0.5)
    seqs = _seqs(8)
    inputs, targets = model.training_example(seqs, np.random.default_rng(0))
    masked = inputs == model.mask_id
    assert masked[:, -1].all() and not masked[seqs == 0].any()
    assert torch.equal(targets[masked], seqs[masked]) and (targets[~masked] == 0).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("transformer4rec", 10)
    with pytest.raises(ValueError, match="item_embedding must be one of"):
        build_model("sasrec", 10, item_embedding="hashed")
    with pytest.raises(ValueError, match="needs codes"):
        build_model("sasrec", 10, item_embedding="recjpq")
    with pytest.raises(ValueError, match="one row per item"):
        build_model("sasrec", 10, item_embedding="recjpq", codes=torch.zeros(10, 2, dtype=torch.uint8))


@settings(max_examples=15, deadline=None, derandomize=True)
@given(embedding=st.sampled_from(EMBEDDINGS), seed=st.integers(0, 10_000), exclude_seen=st.booleans(),
       k=st.integers(1, NUM_ITEMS))
def test_evaluate_matches_brute_force_ranks(embedding, seed, exclude_seen, k):
    model = _model("sasrec", embedding, seed=seed)
    rng = np.random.default_rng(seed)
    histories = [rng.integers(1, NUM_ITEMS + 1, rng.integers(1, 12)) for _ in range(7)]
    targets = rng.integers(1, NUM_ITEMS + 1, 7)
    data = EvalSet(histories, targets, np.arange(7))
    got = evaluate(model, data, ks=(k,), exclude_seen=exclude_seen, batch_size=3)
    ranks = target_ranks(model, data, k, exclude_seen=exclude_seen, batch_size=2)
    with torch.no_grad():
        scores = (model.query(pad_left(histories, 9)) @ model.item_embedding.weight.t()).double()
    scores[:, 0] = float("-inf")
    ndcg, hits = [], []
    for b, t in enumerate(targets):
        row = scores[b].clone()
        if exclude_seen:
            row[torch.as_tensor(histories[b])] = float("-inf")
        # rank = items strictly better + better-or-equal ties with a lower id (ties go to the lower id)
        rank = int((row > row[t]).sum() + (row[:t] == row[t]).sum())
        inside = bool(torch.isfinite(row[t])) and rank < k
        assert ranks[b] == (rank if inside else np.inf)
        hits.append(inside)
        ndcg.append(1 / np.log2(rank + 2) if inside else 0.0)
    assert got[f"recall@{k}"] == pytest.approx(np.mean(hits))
    assert got[f"ndcg@{k}"] == pytest.approx(np.mean(ndcg), rel=1e-6)
