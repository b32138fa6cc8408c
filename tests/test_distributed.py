"""recjpq.distributed on 2 gloo processes (CPU) against single-process results.

Starting processes costs seconds, so one module fixture spawns the 2 ranks once and runs every
group of cases in them; each test then reads its group's outcome. Cases are drawn from
generators seeded identically on both ranks, so the ranks agree on S, codes, k, exclusions and
shard bounds. A group that raises on a rank records the traceback and stops the workers (the
groups after it are reported as not run).
"""
import datetime
import json
import os
import subprocess
import sys
import traceback

import pytest
import torch
from hypothesis import given, settings, strategies as st
import torch.distributed as dist
import torch.multiprocessing as mp

from recjpq import distributed as rd, ops
from recjpq.data import generate_sequences
from recjpq.models import ItemScorer, softmax_cross_entropy
from recjpq.nn import PQEmbedding
from recjpq.training import TrainConfig, fit
from conftest import random_problem

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available")

WORLD = 2


def _bounds(n, g):
    """Even shards, or a random split point (shards of very different sizes, some smaller than k)."""
    if n < 2 or torch.rand(1, generator=g).item() < 0.3:
        return None
    cut = int(torch.randint(1, n, (1,), generator=g))
    return [(0, cut), (cut, n)]


def _topk_cases(rank, out):
    del out
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        batch, n = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(2, 400, (1,), generator=g))
        m, k_codes = [1, 3, 4, 8][seed % 4], [3, 16, 300][seed % 3]
        S, codes = random_problem(batch, n, m, k_codes, seed=seed, integer_scores=seed % 2 == 0)
        bounds = _bounds(n, g)
        shard = rd.CatalogueShard.from_codes(codes, bounds=bounds)
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        exclude = None
        if seed % 3:  # ids spanning both shards, -1 padding, duplicates; sometimes fewer than k items remain
            width = int(torch.randint(1, n + 2, (1,), generator=g))
            exclude = torch.randint(-1, n, (batch, width), generator=g)
        backend = ["reference", None][seed % 2]
        values, indices = rd.pq_topk(S, shard, k, exclude=exclude, backend=backend)
        ref_values, ref_indices = ops.pq_topk(S, codes, k, exclude=exclude, backend=backend)
        context = f"seed={seed} rank={rank} B={batch} N={n} M={m} K={k_codes} k={k} bounds={shard.bounds}"
        assert torch.equal(indices, ref_indices), context
        assert torch.equal(values, ref_values), context


def _check_cross_entropy(S, codes, shard, targets, **kw):
    """Sharded loss and the all-reduced S gradient against the single-process op."""
    weights = torch.rand(S.shape[0], dtype=S.dtype, generator=torch.Generator().manual_seed(1))
    S_sharded, S_single = S.clone().requires_grad_(), S.clone().requires_grad_()
    loss = rd.pq_cross_entropy(S_sharded, shard, targets, **kw)
    ref = ops.pq_cross_entropy(S_single, codes, targets, **kw)
    tol = dict(rtol=1e-10, atol=1e-10) if S.dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(loss, ref, **tol)
    scale = weights if kw.get("reduction") == "none" else 1.0
    (loss * scale).sum().backward()
    (ref * scale).sum().backward()
    dist.all_reduce(S_sharded.grad)
    torch.testing.assert_close(S_sharded.grad, S_single.grad, **tol)


def _cross_entropy_cases(rank, out):
    del rank, out
    for seed in range(24):
        g = torch.Generator().manual_seed(100 + seed)
        batch, n = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(2, 300, (1,), generator=g))
        m, k_codes = [1, 3, 5][seed % 3], [4, 17, 256][seed % 3]
        S, codes = random_problem(batch, n, m, k_codes, seed=seed)
        dtype = torch.float64 if seed % 4 else torch.float32
        shard = rd.CatalogueShard.from_codes(codes, bounds=_bounds(n, g))
        targets = torch.randint(0, n, (batch,), generator=g)
        targets[torch.rand(batch, generator=g) < 0.25] = -100  # ignored rows
        _check_cross_entropy(S.to(dtype) * 2, codes, shard, targets, reduction=["mean", "sum", "none"][seed % 3],
                             label_smoothing=[0.0, 0.1][seed % 2], temperature=[1.0, 0.7][(seed // 2) % 2])


def _model_loss_case(rank, out):
    """Unequal rows per rank through all_gather_rows: the loss, each rank's row gradients and the
    sub-item gradients summed over ranks equal single-process training on all rows."""
    del out
    torch.manual_seed(0)
    codes = torch.randint(0, 8, (41, 4), dtype=torch.uint8)
    emb = PQEmbedding(codes, 16, 8, padding_idx=0).double()
    scorer = ItemScorer(emb)
    rows = torch.randn(7, 16, dtype=torch.float64)
    targets = torch.randint(1, 41, (7,))
    mine = slice(0, 3) if rank == 0 else slice(3, 7)
    hidden = rows[mine].clone().requires_grad_()
    shard = rd.CatalogueShard.from_codes(codes[1:])
    loss = rd.softmax_cross_entropy(scorer, hidden, targets[mine], shard)
    loss.backward()
    sharded_sub = emb.subitem_embeddings.grad.clone()
    dist.all_reduce(sharded_sub)
    emb.subitem_embeddings.grad = None
    full = rows.clone().requires_grad_()
    ref = softmax_cross_entropy(scorer, full, targets)
    ref.backward()
    tol = dict(rtol=1e-5, atol=1e-6)  # S is float32 (ops.subitem_scores)
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(hidden.grad, full.grad[mine], **tol)
    torch.testing.assert_close(sharded_sub, emb.subitem_embeddings.grad, **tol)


def _bad_input_cases(rank, out):
    del rank, out
    S, codes = random_problem(2, 10, 3, 5)
    shard = rd.CatalogueShard.from_codes(codes)
    with pytest.raises(ValueError, match="k must be in"):
        rd.pq_topk(S, shard, 11)
    with pytest.raises(ValueError, match="exclude ids"):
        rd.pq_topk(S, shard, 3, exclude=torch.tensor([[10], [0]]))
    with pytest.raises(ValueError, match="splits"):
        rd.pq_topk(S[:, :2], shard, 3)
    with pytest.raises(ValueError, match="targets must be in"):
        rd.pq_cross_entropy(S, shard, torch.tensor([0, 10]))
    with pytest.raises(TypeError, match="CatalogueShard"):
        rd.pq_topk(S, codes, 3)
    with pytest.raises(ValueError, match="tiling"):
        rd.CatalogueShard.from_codes(codes, bounds=[(0, 4), (5, 10)])
    with pytest.raises(ValueError, match="tiling"):  # shards given per rank must tile [0, N) too
        rd.CatalogueShard(codes[:4], 0, 12)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10_000), st.integers(1, 64))
def test_even_bounds_tile_the_catalogue(n, world):
    if n < world:
        with pytest.raises(ValueError, match="cannot give"):
            rd.even_bounds(n, world)
        return
    bounds = rd.even_bounds(n, world)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [end - start for start, end in bounds]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_shard_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        rd.CatalogueShard.from_codes(torch.zeros(4, 2, dtype=torch.uint8))


def _train_config(**kw):
    base = dict(model="sasrec", embedding="recjpq", codes="random", splits=4, num_codes=8, dim=16, max_len=12,
                batch_size=24, lr=5e-3, dropout=0.0, epochs=1, max_steps=3, valid_users=20)
    return TrainConfig(**{**base, **kw})


def _fit_state(config):
    torch.set_default_dtype(torch.float64)  # a float64 model (S stays float32): rounding stays far below the check
    try:
        result = fit(generate_sequences(100, 60, num_clusters=4, mean_length=12, seed=0), config, progress=False)
    finally:
        torch.set_default_dtype(torch.float32)
    return result


def _train_case(rank, out):
    sharded = _fit_state(_train_config(shard_catalogue=True))
    plain = _fit_state(_train_config())
    torch.save({"sharded": sharded.model.state_dict(), "plain": plain.model.state_dict(),
                "losses": [h["loss"] for h in sharded.history + plain.history], "valid": sharded.valid},
               os.path.join(out, f"rank{rank}.pt"))


GROUPS = {"topk": _topk_cases, "cross_entropy": _cross_entropy_cases, "model_loss": _model_loss_case,
          "bad_input": _bad_input_cases, "training": _train_case}


def _worker(rank, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))  # a rank stuck in a collective fails, not hangs
    try:
        for name, fn in GROUPS.items():
            try:
                fn(rank, out)
            except BaseException:
                with open(os.path.join(out, f"{name}.rank{rank}.err"), "w") as f:
                    f.write(traceback.format_exc())
                raise
            open(os.path.join(out, f"{name}.rank{rank}.ok"), "w").close()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks_run(tmp_path_factory):
    """The output folder of one 2-rank run of every group, and the spawn error if any."""
    out = tmp_path_factory.mktemp("ranks")
    try:
        mp.spawn(_worker, args=(str(out / "store"), str(out)), nprocs=WORLD, join=True)
    except mp.ProcessRaisedException as e:
        return out, str(e)
    return out, None


def _outcome(ranks_run, name):
    out, error = ranks_run
    for rank in range(WORLD):
        err = out / f"{name}.rank{rank}.err"
        if err.exists():
            pytest.fail(f"rank {rank}:\n{err.read_text()}")
        if not (out / f"{name}.rank{rank}.ok").exists():
            pytest.fail(f"group {name!r} did not run on rank {rank}: {error}")
    return out


def test_sharded_topk_equals_single_process(ranks_run):
    """Unequal shards, k larger than a shard, exclusions spanning shards, ties (integer S)."""
    _outcome(ranks_run, "topk")


def test_sharded_cross_entropy_and_gradients_equal_single_process(ranks_run):
    _outcome(ranks_run, "cross_entropy")


def test_gathered_rows_loss_and_gradients_equal_single_process(ranks_run):
    _outcome(ranks_run, "model_loss")


def test_bad_inputs_raise_on_every_rank(ranks_run):
    _outcome(ranks_run, "bad_input")


def test_data_parallel_training_matches_one_process(ranks_run):
    """Sharded output layer + DDP on 2 ranks = one process on the same global batches."""
    out = _outcome(ranks_run, "training")
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]
    single = _fit_state(_train_config())
    for name, value in single.model.state_dict().items():
        # measured: ~1e-8 apart (S is float32); plain DDP, averaging per-rank means, lands ~1e-2 away
        torch.testing.assert_close(ranks[0]["sharded"][name], value, rtol=0, atol=1e-6, msg=name)
        for r in ranks:  # plain DDP (no sharding) keeps the replicas identical
            torch.testing.assert_close(r["plain"][name], ranks[0]["plain"][name], rtol=0, atol=0, msg=name)
    assert ranks[0]["valid"] == ranks[1]["valid"] == pytest.approx(single.valid)  # rank 0's, broadcast
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in ranks)


def test_torchrun_cli(tmp_path):
    """``torchrun --nproc_per_node 2 -m recjpq train --shard-catalogue``: rank 0 writes the files."""
    data = generate_sequences(60, 40, num_clusters=4, mean_length=8, seed=0)
    path = tmp_path / "tiny.txt"
    path.write_text("".join(f"u{u} {i}\n" for u, seq in enumerate(data.sequences) for i in seq))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "-m", "recjpq", "--threads", "1", "train", "--data", str(path), "--embedding", "recjpq", "--codes", "random",
           "--splits", "4", "--num-codes", "8", "--dim", "16", "--max-len", "8", "--batch-size", "16", "--epochs", "1",
           "--max-steps", "3", "--shard-catalogue", "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["shard_catalogue"] and 0 <= metrics["ndcg@10"] <= 1
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in metrics["history"])
    assert (out / "model.pt").is_file()
