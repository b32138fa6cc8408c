"""``recjpq demo`` on tiny data (seconds), its pieces, and the synthetic generator's statistics."""
import contextlib
import io
import json
import sys

import numpy as np
import pytest
import torch

from recjpq import demo
from recjpq.cli import main
from recjpq.data import generate_sequences
from recjpq.data.synthetic import sequence_statistics
from recjpq.models import build_model


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One quick demo on a user file with matplotlib hidden: the report must still come out."""
    data = generate_sequences(120, 100, num_clusters=5, mean_length=10, seed=1)
    path = tmp_path_factory.mktemp("data") / "log.txt"
    path.write_text("".join(f"u{u} i{i}\n" for u, seq in enumerate(data.sequences) for i in seq))
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()  # capsys is function-scoped
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        mp.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
        main(["demo", "--quick", "--data", str(path), "--budget", "6", "--out", str(out)])
    return out, buf.getvalue(), json.loads((out / "demo.json").read_text())


def test_demo_without_matplotlib_writes_table_markdown_json(report):
    out, printed, summary = report
    first_line = printed.splitlines()[0]
    assert "matplotlib is not installed" in first_line and "pip install 'recjpq[demo]'" in first_line
    assert not (out / "demo.png").exists()
    assert "| model | item bytes | NDCG@10 |" in printed and "busy core p99" in printed
    assert printed.count("| dense d=") == 2 and printed.count("| RecJPQ M=") == 3
    md = (out / "demo.md").read_text()
    assert "| RecJPQ M=4 K=64 |" in md and "Pareto front" in md
    assert summary["data"]["source"].endswith("log.txt") and summary["data"]["users"] == 120


def test_demo_frontier_points_are_measured_and_priced(report):
    _, _, summary = report
    points = summary["frontier"]
    items = summary["data"]["items"]
    assert len(points) == 5
    for p in points:
        assert 0 <= p["ndcg@10"] <= p["recall@10"] <= 1 and p["epochs"] >= 1
        if p["embedding"] == "dense":
            assert p["item_bytes"] == (items + 1) * p["d"] * 4
        else:  # uint8 codes (K <= 256) per item and padding row, plus float32 sub-item embeddings
            assert p["item_bytes"] == (items + 1) * p["M"] + p["K"] * p["d"] * 4
    front = [p for p in points if p["pareto"]]
    assert front and max(points, key=lambda p: p["ndcg@10"]) in front


def test_demo_latency_rows(report):
    _, _, summary = report
    rows = summary["latency"]
    assert {r["items"] for r in rows} == set(demo.QUICK.catalogues)
    assert {r["method"] for r in rows} >= {"recjpq", "dense"}
    for r in rows:
        for load in ("idle", "busy"):
            assert 0 < r[f"{load}_p50_ms"] <= r[f"{load}_p99_ms"] and r[f"{load}_samples"] >= 10


def test_demo_plot_reads_its_own_json(report, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, summary = report
    path = tmp_path / "demo.png"
    demo.plot(str(path), summary["frontier"], summary["latency"], "tiny", demo.QUICK.latency_shape, threads=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_marks_points_no_smaller_model_beats():
    points = [{"item_bytes": b, "ndcg@10": q} for b, q in [(10, 0.1), (20, 0.05), (30, 0.2), (30, 0.15), (40, 0.2)]]
    demo.pareto(points)
    assert [p["pareto"] for p in points] == [True, False, True, False, False]


def test_item_bytes_counts_codes_and_tables():
    codes = torch.randint(0, 1024, (51, 4), dtype=torch.int16)
    pq = build_model("sasrec", 50, codes=codes, dim=32, item_embedding="recjpq", num_codes=1024, max_len=8)
    assert demo.item_bytes(pq) == 51 * 4 * 2 + 1024 * 32 * 4
    dense = build_model("sasrec", 50, dim=32, max_len=8)
    assert demo.item_bytes(dense) == 51 * 32 * 4


def test_busy_core_stops_its_process():
    with demo.BusyCore() as busy:
        assert busy.proc.poll() is None
    assert busy.proc.poll() is not None


def test_demo_bad_input_is_a_message(tmp_path):
    with pytest.raises(SystemExit, match="budget must be positive"):
        main(["demo", "--quick", "--budget", "0", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="recjpq demo: error: .*no-such-file"):
        main(["demo", "--quick", "--data", str(tmp_path / "no-such-file.txt"), "--out", str(tmp_path)])


def test_sequence_statistics_on_a_known_log():
    seqs = [np.array([1, 2, 3]), np.array([1, 2, 1]), np.array([1, 2]), np.array([4, 2])]
    s = sequence_statistics(seqs, num_items=5, k=1)
    assert (s["users"], s["interactions"], s["length_min"], s["length_max"]) == (4, 10, 2, 3)
    assert s["repeat_share"] == round(1 / 6, 3)  # one repeated item over six transitions
    # fitted on users 0 and 2 (1->2 twice, 2->3 once); tested on users 1 and 3: 1->2 hits, 2->1 and 4->2 miss
    assert s["successor_hit@1"] == round(1 / 3, 3)
    assert s["popularity_hit@1"] == round(1 / 3, 3)  # item 1 or 2 (tied, lower id wins: 1): 2->1 only
    assert s["top1%_share"] == 0.4  # item 2: 4 of 10


def test_generator_avoids_repeats_unless_asked():
    plain = generate_sequences(300, 400, mean_length=30, seed=0)
    assert sequence_statistics(plain.sequences, 400)["repeat_share"] < 0.01
    again = generate_sequences(300, 400, mean_length=30, repeats=True, seed=0)
    assert sequence_statistics(again.sequences, 400)["repeat_share"] > 0.05
    lengths = np.array([len(s) for s in plain.sequences])
    assert lengths.min() >= 5 and abs(lengths.mean() - 30) < 5 and np.median(lengths) < lengths.mean()
