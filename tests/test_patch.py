"""recjpq.patch: the patched model ranks exactly as PQ scores computed by hand, for the three
supported shapes of model code; what it cannot patch is refused before anything changes.

The two stand-ins below are our own minimal models written from the API shapes described in
docs (pmixer SASRec.pytorch: ``item_emb`` + ``log2feats`` + ``predict``; RecBole:
``item_embedding`` + ``forward(item_seq, item_seq_len)`` + ``full_sort_predict``).
"""
from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from torch import nn

from recjpq.models import SASRec
from recjpq.nn import PQEmbedding
from recjpq.patch import detect_style, patch_item_scoring
from sasrec_pytorch_style import SASRecPytorchStyle

NUM_ITEMS, DIM, MAX_LEN = 150, 16, 12


class RecBoleStyle(nn.Module):
    ITEM_SEQ = "item_id_list"
    ITEM_SEQ_LEN = "item_length"

    def __init__(self, n_items: int, hidden: int):
        super().__init__()
        self.item_embedding = nn.Embedding(n_items, hidden, padding_idx=0)
        self.encoder = nn.GRU(hidden, hidden, batch_first=True)

    def forward(self, item_seq, item_seq_len):
        out, _ = self.encoder(self.item_embedding(item_seq))
        return out[torch.arange(len(item_seq)), item_seq_len - 1]

    def calculate_loss(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        logits = torch.matmul(seq_output, self.item_embedding.weight.transpose(0, 1))
        return nn.functional.cross_entropy(logits, interaction["pos_item_id"])

    def full_sort_predict(self, interaction):
        seq_output = self.forward(interaction[self.ITEM_SEQ], interaction[self.ITEM_SEQ_LEN])
        return torch.matmul(seq_output, self.item_embedding.weight.transpose(0, 1))


def histories(batch=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    seqs = torch.randint(1, NUM_ITEMS + 1, (batch, MAX_LEN), generator=g)
    lengths = torch.randint(2, MAX_LEN + 1, (batch,), generator=g)
    seqs[torch.arange(MAX_LEN) >= lengths[:, None]] = 0  # right-padded (RecBole) ...
    return seqs, lengths


def scores_by_hand(pq: PQEmbedding, state: torch.Tensor) -> torch.Tensor:
    """score[b, i] = sum_m <state_m, centroid[m, codes[i, m]]>, padding item scored 0."""
    sub = state.view(len(state), pq.num_splits, -1)
    table = torch.einsum("bmd,mkd->bmk", sub.double(), pq.subitem_embeddings.detach().double())
    codes = pq.codes.long()
    scores = sum(table[:, m, codes[:, m]] for m in range(pq.num_splits))
    scores[:, pq.padding_idx] = 0
    return scores


def assert_same_ranking(values, ids, by_hand, k):
    """Top-k equal to the by-hand scores (values exact to float32, every id really has its value)."""
    masked = by_hand.clone()
    masked[:, 0] = float("-inf")
    assert torch.allclose(values.double(), masked.topk(k).values, atol=1e-4)
    assert torch.allclose(torch.gather(masked, 1, ids), values.double(), atol=1e-4)
    assert (ids != 0).all()


def query_metric_for_tests(dim=DIM, seed=0):
    """A full-rank, non-diagonal ``quantize`` metric: the table's rotation is then not orthogonal."""
    a = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed))
    return a @ a.T / dim + 0.1 * torch.eye(dim)


# the tables a converted model can have: plain PQ, OPQ (orthogonal rotation), a query metric with
# OPQ (a general rotation)
TABLE_KINDS = ("plain", "opq", "metric")


def table_kwargs(kind: str) -> dict:
    return {"plain": {}, "opq": {"rotate": True}, "metric": {"rotate": True, "metric": query_metric_for_tests()}}[kind]


@pytest.mark.parametrize("kind", TABLE_KINDS)
def test_sasrec_pytorch_style(kind):
    torch.manual_seed(0)
    model = SASRecPytorchStyle(NUM_ITEMS, DIM, MAX_LEN).eval()
    seqs, _ = histories()
    log_seqs = seqs.flip(1).numpy()  # left-padded, as the original feeds them
    candidates = np.array([1, 5, 17, 99, NUM_ITEMS])
    dense_scores = model.predict(None, log_seqs, candidates)
    pq = patch_item_scoring(model, 4, 32, iters=5, **table_kwargs(kind))
    assert model.item_emb is pq and pq.padding_idx == 0
    with torch.no_grad():
        state = model.log2feats(log_seqs)[:, -1, :]
        state_pq = state if kind == "plain" else state @ pq.rotation
        by_hand = scores_by_hand(pq, state_pq)
        assert torch.allclose(model.predict(None, log_seqs, candidates).double(), by_hand[:, candidates], atol=1e-4)
        values, ids = model.predict_topk(None, log_seqs, 10)
        assert_same_ranking(values, ids, by_hand, 10)
        exclude = torch.as_tensor(log_seqs[:, -3:])
        values, ids = model.predict_topk(None, log_seqs, 10, exclude=exclude)
        by_hand.scatter_(1, exclude, float("-inf"))
        assert_same_ranking(values, ids, by_hand, 10)
    assert dense_scores.shape == (5, len(candidates))


def test_recbole_style_full_sort_and_loss():
    torch.manual_seed(1)
    model = RecBoleStyle(NUM_ITEMS + 1, DIM).eval()
    seqs, lengths = histories(batch=6, seed=1)
    interaction = {RecBoleStyle.ITEM_SEQ: seqs, RecBoleStyle.ITEM_SEQ_LEN: lengths,
                   "pos_item_id": torch.randint(1, NUM_ITEMS + 1, (6,))}
    pq = patch_item_scoring(model, 8, 16, iters=5)
    assert detect_style(RecBoleStyle(4, 8)) == "recbole"
    with torch.no_grad():
        by_hand = scores_by_hand(pq, model.forward(seqs, lengths))
        full = model.full_sort_predict(interaction)
        assert full.shape == (6, NUM_ITEMS + 1)
        assert torch.allclose(full.double(), by_hand, atol=1e-4)
        values, ids = model.full_sort_topk(interaction, 7)
        assert_same_ranking(values, ids, by_hand, 7)
    loss = model.calculate_loss(interaction)  # reads .weight: decoded, differentiable
    loss.backward()
    assert pq.subitem_embeddings.grad is not None and pq.subitem_embeddings.grad.abs().sum() > 0


def test_our_dense_sasrec():
    torch.manual_seed(2)
    model = SASRec(NUM_ITEMS, DIM, item_embedding="dense", num_layers=1, max_len=MAX_LEN).eval()
    history = [[3, 9, 27, 81], [1, 2], [150, 149, 148, 7, 7]]
    pq = patch_item_scoring(model, 4, 64, iters=5)
    assert model.item_embedding is pq and model.config["item_embedding"] == "recjpq"
    assert model.scorer.is_pq
    values, ids = model.recommend(history, k=10, exclude_seen=False)
    from recjpq.data import pad_left
    with torch.no_grad():
        by_hand = scores_by_hand(pq, model.query(pad_left([np.array(h) for h in history], MAX_LEN)))
    assert_same_ranking(values, ids, by_hand, 10)
    values, ids = model.recommend(history, k=10)
    for row, h in zip(ids.tolist(), history):
        assert not set(row) & set(h)


class Untied(nn.Module):
    def __init__(self):
        super().__init__()
        self.item_embedding = nn.Embedding(50, 8, padding_idx=0)
        self.output = nn.Linear(8, 50, bias=False)
        self.ITEM_SEQ, self.ITEM_SEQ_LEN = "s", "l"

    def forward(self, item_seq, item_seq_len):
        return self.item_embedding(item_seq)[:, -1]

    def full_sort_predict(self, interaction):
        return self.output(self.forward(interaction["s"], interaction["l"]))


class NoFields(nn.Module):
    """RecBole-like but without the ITEM_SEQ / ITEM_SEQ_LEN field names."""

    def __init__(self):
        super().__init__()
        self.item_embedding = nn.Embedding(50, 8, padding_idx=0)

    def full_sort_predict(self, interaction):
        return interaction["seq_output"] @ self.item_embedding.weight.T


class NoLog2Feats(nn.Module):
    def __init__(self):
        super().__init__()
        self.item_emb = nn.Embedding(50, 8)

    def predict(self, user_ids, log_seqs, item_indices):
        return self.item_emb(item_indices)


class MaxNorm(SASRecPytorchStyle):
    def __init__(self):
        super().__init__(40, 8, 4)
        self.item_emb = nn.Embedding(41, 8, padding_idx=0, max_norm=1.0)


@pytest.mark.parametrize("make,match", [
    (lambda: nn.Linear(3, 3), "cannot patch Linear"),
    (Untied, "second item-sized table 'output'"),
    (NoFields, "ITEM_SEQ"),
    (NoLog2Feats, "log2feats"),
    (MaxNorm, "max_norm"),
])
def test_refuses_what_it_cannot_patch(make, match):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        patch_item_scoring(model, 2, 16)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_refuses_twice_and_non_modules():
    model = SASRecPytorchStyle(40, 8, 4)
    patch_item_scoring(model, 2, 8, iters=2)
    with pytest.raises(ValueError, match="already a PQEmbedding"):
        patch_item_scoring(model, 2, 8)
    with pytest.raises(TypeError, match="nn.Module"):
        patch_item_scoring("model", 2)
    with pytest.raises(ValueError, match="divisible"):
        patch_item_scoring(SASRecPytorchStyle(40, 8, 4), 3)


FRESH_PROCESS_TOPK = """
import sys, numpy as np, torch
sys.path.insert(0, {tests!r})
from sasrec_pytorch_style import SASRecPytorchStyle
from recjpq.patch import load
out = []
for path in {paths!r}:
    model, meta = load(path, lambda: SASRecPytorchStyle({items}, {dim}, {max_len}))
    out.append((*model.predict_topk(None, np.load({seqs!r}), 10), meta))
torch.save(out, {out!r})
"""


def test_save_load_sasrec_pytorch_style_in_a_fresh_process(tmp_path):
    import os
    import subprocess
    import sys

    from recjpq.patch import load, save

    log_seqs = histories(batch=7)[0].flip(1).numpy()
    np.save(tmp_path / "seqs.npy", log_seqs)
    paths, expected = [], []
    for kind in TABLE_KINDS:
        torch.manual_seed(3)
        model = SASRecPytorchStyle(NUM_ITEMS, DIM, MAX_LEN).eval()
        patch_item_scoring(model, 4, 32, iters=5, **table_kwargs(kind))
        with torch.no_grad():  # as after fine-tuning: sub-items no longer k-means centroids
            model.item_emb.subitem_embeddings.add_(0.1 * torch.randn_like(model.item_emb.subitem_embeddings))
            expected.append(model.predict_topk(None, log_seqs, 10))
        paths.append(str(tmp_path / f"converted-{kind}.pt"))
        save(model, paths[-1], {"item_ids": ["a", "b"]})
        # in this process too, from an instance, with the rotation (if any) restored
        again, _ = load(paths[-1], SASRecPytorchStyle(NUM_ITEMS, DIM, MAX_LEN))
        assert hasattr(again.item_emb, "rotation") == (kind != "plain")
        if kind != "plain":
            assert torch.equal(again.item_emb.rotation, model.item_emb.rotation)
        assert torch.equal(again.predict_topk(None, log_seqs, 10)[1], expected[-1][1])
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    script = FRESH_PROCESS_TOPK.format(tests=tests_dir, paths=paths, items=NUM_ITEMS, dim=DIM, max_len=MAX_LEN,
                                       seqs=str(tmp_path / "seqs.npy"), out=str(tmp_path / "out.pt"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=300)
    fresh = torch.load(tmp_path / "out.pt", weights_only=True)
    for (values, ids), (fresh_values, fresh_ids, meta) in zip(expected, fresh):
        assert torch.equal(fresh_ids, ids) and torch.equal(fresh_values, values)
        assert meta == {"item_ids": ["a", "b"]}


def test_plain_state_dict_needs_the_patched_layout():
    """What the issue hit: a patched state_dict does not load into the user's class, ``load`` does it."""
    model = SASRecPytorchStyle(NUM_ITEMS, DIM, MAX_LEN)
    patch_item_scoring(model, 4, 16, iters=2)
    with pytest.raises(RuntimeError, match="state_dict"):
        SASRecPytorchStyle(NUM_ITEMS, DIM, MAX_LEN).load_state_dict(model.state_dict())


@pytest.mark.parametrize("kind", TABLE_KINDS)
def test_save_load_our_sasrec_without_factory_and_through_load_checkpoint(tmp_path, kind):
    from recjpq.checkpoint import load_checkpoint
    from recjpq.patch import load, save

    torch.manual_seed(4)
    model = SASRec(NUM_ITEMS, DIM, item_embedding="dense", num_layers=1, max_len=MAX_LEN).eval()
    patch_item_scoring(model, 8, 16, iters=3, **table_kwargs(kind))
    history = [[3, 9, 27, 81], [1, 2], [150, 149, 148, 7, 7]]
    values, ids = model.recommend(history, k=10)
    save(model, tmp_path / "m.pt", {"item_ids": [str(i) for i in range(1, NUM_ITEMS + 1)]})
    for loaded, meta in (load(tmp_path / "m.pt"), load_checkpoint(tmp_path / "m.pt")):  # the server's loader too
        assert isinstance(loaded, SASRec) and loaded.config["item_embedding"] == "recjpq"
        assert hasattr(loaded.item_embedding, "rotation") == (kind != "plain")
        got_values, got_ids = loaded.recommend(history, k=10)
        assert torch.equal(got_ids, ids) and torch.equal(got_values, values)
        assert meta["item_ids"][0] == "1"


@pytest.mark.parametrize("kind", TABLE_KINDS)
def test_server_serves_a_converted_model_file(tmp_path, kind):
    """What docs/convert.md promises: ``recjpq serve converted.pt`` for a ``patch.save`` file of a
    ``recjpq.models`` model answers as the converted model itself does (raw ids from the meta)."""
    pytest.importorskip("fastapi", reason="the serve extra (fastapi) is not installed")
    httpx = pytest.importorskip("httpx", reason="the serve extra (httpx) is not installed")
    from recjpq.patch import save
    from recjpq.serve import Recommender, create_app

    torch.manual_seed(5)
    model = SASRec(NUM_ITEMS, DIM, item_embedding="dense", num_layers=1, max_len=MAX_LEN).eval()
    patch_item_scoring(model, 4, 16, iters=3, **table_kwargs(kind))
    raw_ids = [f"sku-{i}" for i in range(1, NUM_ITEMS + 1)]
    save(model, tmp_path / "converted.pt", {"item_ids": raw_ids})
    recommender = Recommender.from_checkpoint(tmp_path / "converted.pt", max_k=20)
    assert hasattr(recommender.model.item_embedding, "rotation") == (kind != "plain")
    histories = [[3, 9, 27, 81], [150], [150, 149, 148, 7, 7] + list(range(20, 40))]  # the last one > max_len
    app = create_app(recommender, max_wait_ms=0)

    async def requests():
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://converted") as client:
            for exclude_seen in (False, True):
                want_scores, want_ids = model.recommend(histories, k=20, exclude_seen=exclude_seen)
                for history, scores, ids in zip(histories, want_scores, want_ids):
                    r = await client.post("/recommend", json={"history": [raw_ids[i - 1] for i in history],
                                                              "k": 20, "exclude_seen": exclude_seen})
                    assert r.status_code == 200, r.text
                    assert r.json()["items"] == [raw_ids[i - 1] for i in ids.tolist()]
                    np.testing.assert_allclose(r.json()["scores"], scores.tolist(), rtol=1e-5, atol=1e-5)
            r = await client.post("/recommend", json={"history": ["sku-0"], "k": 5})  # not in the catalogue
            assert r.status_code == 422 and "unknown item" in r.json()["detail"]

    asyncio.run(requests())


def test_save_load_errors(tmp_path):
    from recjpq.checkpoint import CheckpointError
    from recjpq.patch import load, save

    dense = SASRecPytorchStyle(NUM_ITEMS, DIM, MAX_LEN)
    with pytest.raises(ValueError, match="not a PQEmbedding"):
        save(dense, tmp_path / "x.pt")
    patch_item_scoring(dense, 4, 16, iters=2)
    save(dense, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="model_factory"):
        load(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="recbole-style"):
        load(tmp_path / "x.pt", lambda: RecBoleStyle(NUM_ITEMS + 1, DIM))
    with pytest.raises(ValueError, match=r"saved table is \[151, 16\]"):
        load(tmp_path / "x.pt", lambda: SASRecPytorchStyle(NUM_ITEMS + 5, DIM, MAX_LEN))
    with pytest.raises(CheckpointError, match="do not fit"):
        load(tmp_path / "x.pt", lambda: SASRecPytorchStyle(NUM_ITEMS, DIM, MAX_LEN + 1))  # pos_emb differs
    with pytest.raises(FileNotFoundError):
        load(tmp_path / "missing.pt", dense)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load(tmp_path / "junk.pt", dense)
    torch.save({"format": "something else"}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="recjpq.patch.save"):
        load(tmp_path / "other.pt", dense)


def test_save_load_recbole_style(tmp_path):
    from recjpq.patch import load, save

    torch.manual_seed(5)
    model = RecBoleStyle(NUM_ITEMS + 1, DIM).eval()
    patch_item_scoring(model, 8, 16, iters=3)
    seqs, lengths = histories(batch=4, seed=2)
    interaction = {RecBoleStyle.ITEM_SEQ: seqs, RecBoleStyle.ITEM_SEQ_LEN: lengths}
    with torch.no_grad():
        values, ids = model.full_sort_topk(interaction, 5)
    save(model, tmp_path / "r.pt")
    loaded, _ = load(tmp_path / "r.pt", lambda: RecBoleStyle(NUM_ITEMS + 1, DIM))
    with torch.no_grad():
        got = loaded.full_sort_topk(interaction, 5)
    assert torch.equal(got[1], ids) and torch.equal(got[0], values)


def test_damaged_converted_files_are_checkpoint_errors(tmp_path):
    """Converted-model files get the checks of recjpq.checkpoint files: a checksum over their
    content and a CheckpointError (never a KeyError / TypeError) for missing or ill-typed entries."""
    from recjpq.checkpoint import CheckpointError, load_checkpoint
    from recjpq.models import build_model
    from recjpq.patch import FORMAT, load, save

    model = build_model("sasrec", NUM_ITEMS, dim=DIM, max_len=MAX_LEN)
    patch_item_scoring(model, 4, 16, iters=2)
    good = tmp_path / "good.pt"
    save(model, good)
    load_checkpoint(good)  # intact: loads
    payload = torch.load(good, weights_only=True)

    def write(name, **changes):
        path = tmp_path / f"{name}.pt"
        torch.save({**payload, **changes}, path)
        return path

    weights = dict(payload["state_dict"])
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1.0  # one changed weight, checksum kept
    cases = {
        "flipped": write("flipped", state_dict=weights),
        "no_checksum": write("no_checksum", checksum=None),
        "no_table": tmp_path / "no_table.pt",
        "bad_config": write("bad_config", config={**payload["config"], "max_len": -3}),
        "table_not_dict": write("table_not_dict", table=[1, 2]),
    }
    torch.save({k: v for k, v in payload.items() if k != "table"}, cases["no_table"])
    from recjpq.checkpoint import checksum
    from recjpq.patch import _CHECKED_KEYS

    for key in ("bad_config", "table_not_dict"):  # past the checksum: the content itself is wrong
        damaged = torch.load(cases[key], weights_only=True)
        damaged["checksum"] = checksum(damaged, _CHECKED_KEYS)
        torch.save(damaged, cases[key])
    assert payload["format"] == FORMAT
    for case, path in cases.items():
        for reader in (load_checkpoint, load):
            with pytest.raises(CheckpointError):
                reader(path)
