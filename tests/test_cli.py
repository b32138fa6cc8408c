"""The ``recjpq`` command end to end on tiny synthetic data."""
import json

import pytest

from recjpq.cli import main
from recjpq.data import generate_sequences


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    data = generate_sequences(80, 50, num_clusters=4, mean_length=10, seed=0)
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    # one 'user item' line per interaction, raw ids offset so the id map is exercised
    path.write_text("".join(f"u{u} {100 + i}\n" for u, seq in enumerate(data.sequences) for i in seq))
    return path


@pytest.fixture(scope="module")
def trained(data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    main(["train", "--data", str(data_file), "--model", "sasrec", "--embedding", "recjpq", "--codes", "random",
          "--splits", "4", "--num-codes", "8", "--dim", "16", "--max-len", "10", "--epochs", "2", "--out", str(out),
          "--no-progress"])
    return out


def test_train_writes_checkpoint_and_metrics(trained, data_file):
    metrics = json.loads((trained / "metrics.json").read_text())
    num_items = len({line.split()[1] for line in data_file.read_text().splitlines()})
    assert 0 <= metrics["ndcg@10"] <= metrics["recall@10"] <= 1
    assert metrics["item_embedding_params"] == 4 * 8 * 4
    assert metrics["dense_item_embedding_params"] == (num_items + 1) * 16
    assert metrics["config"]["codes"] == "random"
    assert (trained / "model.pt").is_file()


def test_evaluate_reproduces_train_metrics(trained, data_file, capsys):
    main(["evaluate", str(trained / "model.pt"), "--data", str(data_file), "-k", "5", "10"])
    got = json.loads(capsys.readouterr().out)
    metrics = json.loads((trained / "metrics.json").read_text())
    assert got["ndcg@10"] == pytest.approx(metrics["ndcg@10"]) and "recall@5" in got


def test_recommend_prints_raw_ids(trained, capsys):
    main(["recommend", str(trained / "model.pt"), "--history", "101,102,103", "-k", "4"])
    rows = [line.split("\t") for line in capsys.readouterr().out.strip().splitlines()]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    assert all(100 < int(r[1]) <= 150 and r[1] not in {"101", "102", "103"} for r in rows)
    with pytest.raises(SystemExit, match="unknown item ids"):
        main(["recommend", str(trained / "model.pt"), "--history", "101,99999"])


def test_errors_are_messages_not_tracebacks(tmp_path, data_file):
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\nlonely\n")
    with pytest.raises(SystemExit, match="line 2"):
        main(["train", "--data", str(bad), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="codes must be one of"):
        main(["train", "--data", str(data_file), "--embedding", "recjpq", "--codes", "nope", "--out", str(tmp_path)])
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"\x00" * 10)
    with pytest.raises(SystemExit, match="not a readable recjpq checkpoint"):
        main(["recommend", str(broken), "--history", "1"])

