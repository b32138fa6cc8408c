"""Catalogue-sharded ``recjpq.distributed.pq_topk`` on W gloo processes against single-process
``recjpq.ops.pq_topk`` on the whole catalogue, on this machine.

Each rank runs with one torch thread (W ranks = W cores); single-process runs with 1 and with W
threads. Per query batch the sharded call is split into its phases, each timed on every rank:

- ``local``: ``local_candidates`` (the fused top-k on this rank's shard, keys packed);
- ``gather``: the all_gather of ``B x k`` int64 keys per rank (includes waiting for the slower rank);
- ``merge``: top-k over the ``W x k`` gathered keys per row, unpacked.

``comm_only`` is the same all_gather started right after a barrier (no waiting for a slower
rank): the transport cost alone. ``end_to_end`` times whole ``pq_topk`` calls after a barrier.
Medians over ``--repeat`` calls after one warm-up call. ``communication_share`` is the share of
gather + merge in the time of the rank with the slowest local scan (the one that sets the
pace); ``transport_share`` puts ``comm_only`` in place of gather.

    python bench/distributed_topk.py --items 10000000 --batches 1 64 \\
        --out bench/results/distributed_topk_n10000000.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peers import machine  # noqa: E402
from recjpq import distributed as rd, ops  # noqa: E402
from recjpq.topk_keys import unpack_keys  # noqa: E402


def _problem(args, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``[N, M]`` and S ``[B, M, K]``, the same in every process (seeded)."""
    g = torch.Generator().manual_seed(args.seed)
    codes = torch.randint(0, args.num_codes, (args.items, args.splits), generator=g, dtype=torch.uint8)
    S = torch.randn(batch, args.splits, args.num_codes, generator=torch.Generator().manual_seed(args.seed + batch))
    return codes, S


def _ms(seconds: list[float]) -> float:
    return 1e3 * statistics.median(seconds)


def _worker(rank: int, args, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.world_size)
    codes, _ = _problem(args, 1)
    shard = rd.CatalogueShard.from_codes(codes)
    report = {"rank": rank, "shard_items": shard.end - shard.start, "batches": {}}
    for batch in args.batches:
        _, S = _problem(args, batch)
        values, indices = rd.pq_topk(S, shard, args.k)  # warm-up (prepares the shard's code layout)
        phases = {"local": [], "gather": [], "merge": [], "comm_only": [], "end_to_end": []}
        for _ in range(args.repeat):
            dist.barrier()
            t0 = time.perf_counter()
            keys = rd.local_candidates(S, shard, args.k)
            t1 = time.perf_counter()
            parts = [torch.empty_like(keys) for _ in range(args.world_size)]
            dist.all_gather(parts, keys)
            t2 = time.perf_counter()
            unpack_keys(torch.topk(torch.cat(parts, dim=1), args.k, dim=1).values)
            t3 = time.perf_counter()
            dist.barrier()
            t4 = time.perf_counter()
            dist.all_gather(parts, keys)
            t5 = time.perf_counter()
            dist.barrier()
            t6 = time.perf_counter()
            rd.pq_topk(S, shard, args.k)
            t7 = time.perf_counter()
            for name, seconds in (("local", t1 - t0), ("gather", t2 - t1), ("merge", t3 - t2),
                                  ("comm_only", t5 - t4), ("end_to_end", t7 - t6)):
                phases[name].append(seconds)
        report["batches"][batch] = {name: _ms(s) for name, s in phases.items()}
        if rank == 0:
            torch.save((values, indices), os.path.join(out_dir, f"result_b{batch}.pt"))
    every = [None] * args.world_size
    dist.all_gather_object(every, report)
    if rank == 0:
        with open(os.path.join(out_dir, "ranks.json"), "w") as f:
            json.dump(every, f)
    dist.destroy_process_group()


def _single_process(args, batch: int, threads: int) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    torch.set_num_threads(threads)
    codes, S = _problem(args, batch)
    result = ops.pq_topk(S, codes, args.k)  # warm-up
    seconds = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        ops.pq_topk(S, codes, args.k)
        seconds.append(time.perf_counter() - t0)
    return _ms(seconds), result


def summarise(args, batch: int, per_rank: list[dict], single: dict, shard_items: int) -> dict:
    """Derived figures. The pace is set by the rank with the slowest local scan: its share of time
    outside that scan is the communication share (the other ranks wait for it inside ``gather``)."""
    pace = max(per_rank, key=lambda r: r["local"])
    end_to_end = max(r["end_to_end"] for r in per_rank)
    message = batch * args.k * 8
    return {
        "batch": batch, "per_rank_ms": per_rank, "single_process_ms": single, "end_to_end_ms": end_to_end,
        "sharded_queries_per_s": 1e3 * batch / end_to_end,
        "single_process_queries_per_s": {t: 1e3 * batch / ms for t, ms in single.items()},
        "speedup_vs_single_process_same_cores": single[f"{args.world_size}_threads_ms"] / end_to_end,
        "communication_share": (pace["gather"] + pace["merge"]) / (pace["local"] + pace["gather"] + pace["merge"]),
        "transport_share": pace["comm_only"] / (pace["local"] + pace["comm_only"] + pace["merge"]),
        "local_ns_per_item_per_query": 1e6 * pace["local"] / (shard_items * batch),
        "message_bytes_sent_per_rank": message,
        "message_bytes_received_per_rank": (args.world_size - 1) * message,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=10_000_000)
    p.add_argument("--splits", type=int, default=8)
    p.add_argument("--num-codes", type=int, default=256)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON (default: print only)")
    args = p.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(args, os.path.join(tmp, "store"), tmp), nprocs=args.world_size, join=True)
        with open(os.path.join(tmp, "ranks.json")) as f:
            ranks = json.load(f)
        sharded_results = {b: torch.load(os.path.join(tmp, f"result_b{b}.pt")) for b in args.batches}
    rows = []
    for batch in args.batches:
        single = {}
        for threads in sorted({1, args.world_size}):
            single[f"{threads}_threads_ms"], (values, indices) = _single_process(args, batch, threads)
        got_values, got_indices = sharded_results[batch]
        rows.append({**summarise(args, batch, [r["batches"][str(batch)] for r in ranks], single,
                                 max(r["shard_items"] for r in ranks)),
                     "equals_single_process": bool(torch.equal(got_indices, indices) and torch.equal(got_values, values))})
        print(json.dumps(rows[-1]))
    summary = {"machine": machine(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
               "backend": "gloo", "world_size": args.world_size, "torch_threads_per_rank": 1, "items": args.items,
               "splits": args.splits, "num_codes": args.num_codes, "k": args.k, "repeat": args.repeat,
               "shard_items": [r["shard_items"] for r in ranks], "results": rows}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
