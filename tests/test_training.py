"""A few steps of training per model on tiny synthetic data, metrics, checkpoints."""
import os

import pytest
import torch

from recjpq.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from recjpq.data import generate_sequences
from recjpq.training import TrainConfig, fit


@pytest.fixture(scope="module")
def tiny():
    return generate_sequences(120, 60, num_clusters=4, mean_length=12, seed=0)


def _config(**kw):
    base = dict(splits=4, num_codes=8, dim=16, max_len=12, batch_size=32, lr=5e-3, epochs=6, patience=10)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("model, embedding, loss", [
    ("sasrec", "dense", "ce"), ("sasrec", "recjpq", "ce"), ("sasrec", "recjpq", "bce"),
    ("sasrec", "dense", "gbce"), ("bert4rec", "recjpq", "ce"), ("gru4rec", "recjpq", "ce"), ("gru4rec", "dense", "ce"),
])
def test_loss_falls_and_metrics_are_computed(tiny, model, embedding, loss):
    result = fit(tiny, _config(model=model, embedding=embedding, loss=loss, negatives=8), progress=False)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 6 and losses[-1] < losses[0]
    for split in (result.valid, result.test):
        assert set(split) == {"ndcg@10", "recall@10"}
        assert 0 <= split["ndcg@10"] <= split["recall@10"] <= 1
    assert result.summary()["dense_item_embedding_params"] == 61 * 16


@pytest.mark.parametrize("model", ["sasrec", "bert4rec", "gru4rec"])
def test_bucket_by_length_trains_on_trimmed_batches(tiny, model, monkeypatch):
    import recjpq.training as training

    widths, real = [], training.training_loss
    monkeypatch.setattr(training, "training_loss", lambda m, seqs, *a, **kw: widths.append(seqs.shape[1]) or
                        real(m, seqs, *a, **kw))
    config = _config(model=model, embedding="recjpq", max_len=30, bucket_by_length=True)
    result = fit(tiny, config, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0] and 0 <= result.test["ndcg@10"] <= 1
    full = config.max_len + (model != "bert4rec")
    if model == "gru4rec":  # its state runs through the padding: always the full width
        assert set(widths) == {full}
    else:
        assert min(widths) < full / 2 and max(widths) <= full


def test_recjpq_item_parameters_and_train_only_codes(tiny, monkeypatch):
    import recjpq.training as training

    seen = {}
    real = training.codes_lib.assign_codes

    def spy(interactions, *args, **kwargs):
        seen["n"] = len(interactions[1])
        return real(interactions, *args, **kwargs)

    monkeypatch.setattr(training.codes_lib, "assign_codes", spy)
    result = fit(tiny, _config(embedding="recjpq", splits=4, max_steps=1), progress=False)
    assert result.model.item_embedding_parameters() == 4 * 8 * 4  # M x K x d/M
    evaluated = sum(len(s) >= 3 for s in tiny.sequences)
    assert seen["n"] == tiny.num_interactions - 2 * evaluated  # validation and test items excluded


def test_same_seed_same_result(tiny):
    a = fit(tiny, _config(embedding="recjpq", epochs=1, max_steps=2), progress=False)
    b = fit(tiny, _config(embedding="recjpq", epochs=1, max_steps=2), progress=False)
    assert a.test == b.test and a.history[0]["loss"] == b.history[0]["loss"]


def test_bad_config(tiny):
    with pytest.raises(ValueError, match=r"codes must be one of \("):
        fit(tiny, _config(embedding="recjpq", codes="kmeans"), progress=False)
    with pytest.raises(ValueError, match="bert4rec trains with loss='ce'"):
        fit(tiny, _config(model="bert4rec", loss="bce"), progress=False)
    with pytest.raises(ValueError, match="dim must be"):
        fit(tiny, _config(dim=0), progress=False)


@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])
def test_checkpoint_round_trip(tiny, tmp_path, model):
    result = fit(tiny, _config(model=model, embedding="recjpq", epochs=1, max_steps=1), progress=False)
    path = tmp_path / "m.pt"
    save_checkpoint(path, result.model, {"item_ids": tiny.item_ids})
    assert os.listdir(tmp_path) == ["m.pt"]  # no temporary file left behind
    loaded, meta = load_checkpoint(path)
    assert meta["item_ids"] == tiny.item_ids and loaded.config == result.model.config
    assert torch.equal(loaded.item_embedding.codes, result.model.item_embedding.codes)
    hist = [tiny.sequences[0], tiny.sequences[1][:3]]
    for a, b in zip(loaded.recommend(hist, 7), result.model.recommend(hist, 7)):
        torch.testing.assert_close(a, b)


def test_broken_or_foreign_checkpoints(tiny, tmp_path):
    result = fit(tiny, _config(epochs=1, max_steps=1), progress=False)
    good = tmp_path / "good.pt"
    save_checkpoint(good, result.model)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    future = tmp_path / "future.pt"
    payload = torch.load(good, weights_only=True)
    torch.save({**payload, "version": 99}, future)
    cases = [(truncated, "not a readable"), (garbage, "not a readable"), (foreign, "not a recjpq checkpoint"),
             (future, "version 99")]
    for path, match in cases:
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
