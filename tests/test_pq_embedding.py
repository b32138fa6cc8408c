"""PQEmbedding: the decoded table is the concatenation of sub-item embeddings, every scoring
path agrees with it, and gradients reach the sub-item embeddings through each path."""
import pytest
import torch

from recjpq.nn import PQEmbedding
from conftest import assert_topk


@pytest.fixture
def emb():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (300, 3), dtype=torch.uint8)
    return PQEmbedding(codes, dim=12, num_codes=16)


def test_only_parameters_are_subitem_embeddings(emb):
    assert [n for n, _ in emb.named_parameters()] == ["subitem_embeddings"]
    assert emb.subitem_embeddings.shape == (3, 16, 4)
    assert "codes" in emb.state_dict() and emb.state_dict()["codes"].dtype == torch.uint8


def test_forward_is_concatenation(emb):
    ids = torch.tensor([[0, 5], [299, 5]])
    out = emb(ids)
    assert out.shape == (2, 2, 12)
    for i in (0, 5, 299):
        expected = torch.cat([emb.subitem_embeddings[m, emb.codes[i, m].long()] for m in range(3)])
        assert torch.equal(emb(torch.tensor(i)), expected)


def test_state_dict_round_trip(emb):
    other = PQEmbedding(torch.zeros(300, 3, dtype=torch.uint8), dim=12, num_codes=16)
    other.load_state_dict(emb.state_dict())
    ids = torch.arange(300)
    assert torch.equal(other(ids), emb(ids))


# score() decodes fewer than M * K / d candidates (here 3 * 16 / 12 = 4) and reads S for more
CANDIDATES = [1, 3, 4, 7]


@pytest.mark.parametrize("t", CANDIDATES)
def test_scoring_paths_agree_with_decoded_table(emb, t):
    seq = torch.randn(4, 12)
    table = emb.weight
    dense = seq @ table.T
    torch.testing.assert_close(emb.score_all(seq), dense, rtol=1e-5, atol=1e-5)
    cand = torch.randint(0, 300, (4, t))
    torch.testing.assert_close(emb.score(seq, cand), dense.gather(1, cand), rtol=1e-5, atol=1e-5)
    shared = torch.randperm(300)[:t]
    torch.testing.assert_close(emb.score(seq, shared), dense[:, shared], rtol=1e-5, atol=1e-5)
    low = emb.score(seq.to(torch.bfloat16), cand)  # both paths score in float32
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, (seq.to(torch.bfloat16).float() @ table.T).gather(1, cand), rtol=1e-5, atol=1e-5)
    values, indices = emb.topk(seq, 10)
    assert_topk(emb.subitem_scores(seq), emb.codes, 10, values, indices)
    # sequence-shaped inputs keep their leading dims
    assert emb.score_all(torch.randn(2, 5, 12)).shape == (2, 5, 300)
    seqs, cands = torch.randn(2, 5, 12), torch.randint(0, 300, (2, 5, t))
    torch.testing.assert_close(emb.score(seqs, cands), (seqs.unsqueeze(-2) * table[cands]).sum(-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="dim=12"):
        emb.score(torch.randn(4, 10), cand)


def _decode(sub, codes):
    return sub[torch.arange(codes.shape[1]), codes.long()].flatten(1)


@pytest.mark.parametrize("path,t", [("forward", 5), ("score", 2), ("score", 5), ("score_all", 5), ("topk", 5)])
def test_gradients_match_the_decoded_table(emb, path, t):
    """Each path's gradient w.r.t. the sub-item embeddings equals the one through the table."""
    seq, w = torch.randn(4, 12), torch.randn(4, t)
    cand, ids = torch.randint(0, 300, (4, t)), torch.tensor([1, 2, 3, 2])
    _, top = emb.topk(seq, 5)
    losses = {  # (through PQEmbedding, through the decoded table)
        "forward": (lambda: (emb(ids) * seq).sum(), lambda t: (t[ids] * seq).sum()),
        "score": (lambda: (emb.score(seq, cand) * w).sum(), lambda t: ((seq[:, None] * t[cand]).sum(-1) * w).sum()),
        "score_all": (lambda: emb.score_all(seq).logsumexp(1).sum(), lambda t: (seq @ t.T).logsumexp(1).sum()),
        "topk": (lambda: (emb.topk(seq, 5)[0] * w).sum(), lambda t: ((seq @ t.T).gather(1, top) * w).sum()),
    }
    ours, reference = losses[path]
    ours().backward()
    sub = emb.subitem_embeddings.detach().clone().requires_grad_(True)
    reference(_decode(sub, emb.codes)).backward()
    assert emb.subitem_embeddings.grad.abs().sum() > 0
    torch.testing.assert_close(emb.subitem_embeddings.grad, sub.grad, rtol=1e-4, atol=1e-5)


def test_padding_idx_embeds_to_zero_and_is_never_recommended():
    codes = torch.randint(0, 16, (50, 3), dtype=torch.uint8)
    emb = PQEmbedding(codes, dim=12, num_codes=16, padding_idx=0)
    assert torch.equal(emb(torch.tensor([0, 0])), torch.zeros(2, 12))
    seq = torch.randn(3, 12)
    assert (emb.score_all(seq)[:, 0] == 0).all()
    assert (emb.score(seq, torch.tensor([0, 4]))[:, 0] == 0).all()
    assert (emb.score(seq, torch.tensor([0, 4, 1, 2, 3]))[:, 0] == 0).all()  # both paths
    # make the padding item's sub-items the best: it must still never be returned
    with torch.no_grad():
        for m in range(3):
            emb.subitem_embeddings[m, codes[0, m].long()] = seq[0, 4 * m:4 * m + 4] * 100
    _, indices = emb.topk(seq, 49)
    assert not (indices == 0).any()
    _, indices = emb.topk(seq, 5, exclude=torch.tensor([[1], [2], [-1]]))
    assert not (indices == 0).any() and indices[0].tolist().count(1) == 0


def test_negative_padding_idx_counts_from_the_end():
    emb = PQEmbedding(torch.zeros(10, 2, dtype=torch.uint8), dim=4, num_codes=4, padding_idx=-1)
    assert emb.padding_idx == 9


def test_wide_codes_for_large_k():
    codes = torch.randint(0, 1000, (200, 2), dtype=torch.int16)
    emb = PQEmbedding(codes, dim=8, num_codes=1000)
    seq = torch.randn(2, 8)
    torch.testing.assert_close(emb.score_all(seq), seq @ emb.weight.T, rtol=1e-5, atol=1e-5)
