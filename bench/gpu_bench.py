"""pq_topk on every GPU backend of recjpq against the peers, at the GPU issue's shapes.

Peers (same catalogue, same queries, timed in the same run): the decoded item matrix in bf16,
``q @ W.T`` and ``torch.topk`` ("dense"), and RecJPQ's PQTopK split loop in plain PyTorch
("split_loop", from bench/peers.py). recjpq and the split loop include building S from the
queries. Per shape it also records each backend's peak extra memory (a B x N buffer would show),
its lookups per second (B*N*M table lookups per call) and, once per card, the L1 lookup ceiling.

    python bench/gpu_bench.py [--quick] [--n 1e6 1e7] [--m 8 32] [--b 1 16] [--k 10 100]

Each shape runs in its own try/except; the JSON (``$OUT`` or bench/results) is rewritten after
every shape, and no new shape starts once ``--budget-s`` has passed, to fit a 10-minute slot.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import recjpq  # noqa: E402
from bench.peers import Catalogue, machine, recjpq_topk, split_loop_topk  # noqa: E402

# recjpq.ops.pq_topk_query's tensor-core algorithms (triton), timed at batches this large only
DECODE_ALGORITHMS, DECODE_MIN_BATCH = ("decode", "decode_tf32x3", "decode_bf16"), 256
FULL = {"n": [1_000_000, 10_000_000], "m": [8, 32], "b": [1, 16, 256, 1024], "k": [10, 100]}
QUICK = {"n": [1_000_000, 10_000_000], "m": [32], "b": [1, 16, 1024], "k": [10, 100]}
D, NUM_CODES = 512, 256


class GpuCatalogue(Catalogue):
    """bench/peers.py's catalogue, drawn on the GPU, with the dense peer's bf16 item matrix."""

    def __init__(self, n, m, d, batch, num_codes=NUM_CODES, seed=0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.codes = torch.randint(0, num_codes, (n, m), generator=g, device="cuda", dtype=torch.int32)
        self.codes = self.codes.to(recjpq.codes.codes_dtype(num_codes))
        self.centroids = torch.randn(m, num_codes, d // m, generator=g, device="cuda")
        self.queries = torch.randn(batch, d, generator=g, device="cuda")
        self.num_codes = num_codes
        self._codes_long = None
        self.items_bf16 = torch.empty(n, d, dtype=torch.bfloat16, device="cuda")
        splits = torch.arange(m, device="cuda")
        for start in range(0, n, 1 << 20):  # decode in chunks: float32 [N, d] would be 20 GB at N=1e7
            chunk = self.codes[start:start + (1 << 20)].long()
            self.items_bf16[start:start + chunk.shape[0]] = self.centroids[splits, chunk].flatten(1)


def decode_topk(cat: GpuCatalogue, queries: torch.Tensor, k: int, algorithm: str):
    return recjpq.ops.pq_topk_query(queries, cat.centroids, cat.codes, k, backend="triton", algorithm=algorithm)


def dense_bf16_topk(cat: GpuCatalogue, queries: torch.Tensor, k: int):
    return torch.topk(queries.to(torch.bfloat16) @ cat.items_bf16.T, k, dim=1)


@triton.jit
def _lookup_ceiling_kernel(table, out, ITERS: tl.constexpr, TABLE: tl.constexpr, BLOCK: tl.constexpr):
    """Random L1-resident gathers from one ``TABLE``-float row per program: the pq kernels' inner loop."""
    pid = tl.program_id(0)
    lane = tl.arange(0, BLOCK).to(tl.uint32)
    row = table + (pid % 64) * TABLE
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for it in range(ITERS):
        idx = ((lane + it * BLOCK + pid) * 2654435761) >> 19
        acc += tl.load(row + (idx % TABLE).to(tl.int32))
    tl.store(out + pid * BLOCK + tl.arange(0, BLOCK), acc)


def lookup_ceiling() -> dict:
    """Lookups per second of random gathers from a 32 KB (M=32, K=256 fp32) table, whole card."""
    table_size, block, iters = 32 * NUM_CODES, 1024, 4096
    programs = torch.cuda.get_device_properties(0).multi_processor_count * 16
    table = torch.randn(64, table_size, device="cuda")
    out = torch.empty(programs * block, device="cuda")
    run = lambda: _lookup_ceiling_kernel[(programs,)](table, out, ITERS=iters, TABLE=table_size, BLOCK=block)
    ms = do_bench(run, warmup=50, rep=300, return_mode="median")
    lookups = programs * block * iters
    return {"lookups_per_s": lookups / (ms * 1e-3), "ms": ms, "lookups": lookups, "table_floats": table_size}


def peak_extra_bytes(fn) -> int:
    """Memory one call allocates beyond what is already held (after a warm-up call)."""
    fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def time_ms(fn) -> float:
    return do_bench(fn, warmup=20, rep=100, return_mode="median")


def bench_shape(cat: GpuCatalogue, n, m, batch, k, backends) -> dict:
    q = cat.queries[:batch].contiguous()
    row = {"n": n, "m": m, "d": D, "num_codes": NUM_CODES, "batch": batch, "k": k, "ms": {}, "errors": {}}
    runs = {f"recjpq:{b}": (lambda b=b: recjpq_topk(cat, q, k, backend=b)) for b in backends}
    if batch >= DECODE_MIN_BATCH and "triton" in backends:
        runs.update({f"recjpq:triton:{a}": (lambda a=a: decode_topk(cat, q, k, a)) for a in DECODE_ALGORITHMS})
    runs["dense_bf16"] = lambda: dense_bf16_topk(cat, q, k)
    runs["split_loop"] = lambda: split_loop_topk(cat, q, k)
    for name, fn in runs.items():
        try:
            row["ms"][name] = time_ms(fn)
            if name.startswith("recjpq:"):
                extra = peak_extra_bytes(fn)
                row.setdefault("peak_extra_bytes", {})[name] = extra
                row.setdefault("no_bxn_buffer", {})[name] = extra < batch * n  # < 1 byte per (query, item)
        except Exception as e:  # OOM at the largest shapes is expected for the peers
            row["errors"][name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        torch.cuda.empty_cache()
    lookups = batch * n * m
    row["lookups"] = lookups
    row["lookups_per_s"] = {name: lookups / (ms * 1e-3) for name, ms in row["ms"].items() if name.startswith("recjpq:")}
    for name, ms in row["ms"].items():
        if name.startswith("recjpq:"):
            row.setdefault("speedup", {})[name] = {p: row["ms"][p] / ms for p in ("dense_bf16", "split_loop")
                                                   if p in row["ms"]}
    return row


def check_against_reference(cat, batch, k, backends) -> dict:
    """Every backend's top-k equals the reference's on this catalogue (values and ids)."""
    from recjpq import ops

    S = ops.subitem_scores(cat.queries[:batch], cat.centroids)
    want = ops.pq_topk(S, cat.codes, k, backend="reference")
    result = {}
    for b in backends:
        got = ops.pq_topk(S, cat.codes, k, backend=b)
        result[b] = bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
    if "triton" in backends:
        for algorithm in DECODE_ALGORITHMS:  # new and unmeasured: a failure must not cost the shape
            try:
                got = decode_topk(cat, cat.queries[:batch], k, algorithm)
                result[f"triton:{algorithm}"] = bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
            except Exception as e:
                result[f"triton:{algorithm}"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller sweep: " + json.dumps(QUICK))
    for key in ("n", "m", "b", "k"):
        parser.add_argument(f"--{key}", type=float, nargs="+", help=f"override the sweep's {key}")
    parser.add_argument("--backends", nargs="+", help="default: every available cuda backend but reference")
    parser.add_argument("--budget-s", type=float, default=480, help="start no new shape after this many seconds")
    parser.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_bench.py needs a CUDA GPU")

    sweep = dict(QUICK if args.quick else FULL)
    for key in sweep:
        if getattr(args, key):
            sweep[key] = [int(v) for v in getattr(args, key)]
    backends = args.backends or [b for b in recjpq.available_backends("cuda") if b != "reference"]
    os.makedirs(args.out, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    path = os.path.join(args.out, f"gpu_bench_{gpu}_{time.strftime('%Y%m%dT%H%M%S')}.json")
    report = {"machine": machine(), "triton": triton.__version__, "backends": backends, "sweep": sweep,
              "lookup_ceiling": None, "checks": [], "results": []}

    def save():
        with open(path, "w") as f:
            json.dump(report, f, indent=1)

    start = time.time()
    try:
        report["lookup_ceiling"] = lookup_ceiling()
        print(f"lookup ceiling: {report['lookup_ceiling']['lookups_per_s']:.3g} lookups/s", flush=True)
    except Exception:
        report["lookup_ceiling"] = {"error": traceback.format_exc(limit=2)}
    decode_columns = [f"recjpq:triton:{a}" for a in DECODE_ALGORITHMS] if "triton" in backends else []
    print(f"{'N':>9} {'M':>3} {'B':>5} {'k':>4} " + " ".join(f"{n:>16}" for n in
          [f"recjpq:{b}" for b in backends] + ["dense_bf16", "split_loop"] + decode_columns) + "  (ms)", flush=True)
    for n in sweep["n"]:
        for m in sweep["m"]:
            if time.time() - start > args.budget_s:
                break
            try:
                cat = GpuCatalogue(n, m, D, max(sweep["b"]))
                batch = min(16, max(sweep["b"]))
                report["checks"].append({"n": n, "m": m, "batch": batch, "k": 100,
                                         "equal_to_reference": check_against_reference(cat, batch, 100, backends)})
            except Exception:
                report["results"].append({"n": n, "m": m, "error": traceback.format_exc(limit=3)})
                save()
                continue
            for batch in sweep["b"]:
                for k in sweep["k"]:
                    if time.time() - start > args.budget_s:
                        report["stopped_early"] = f"budget of {args.budget_s} s reached"
                        break
                    try:
                        row = bench_shape(cat, n, m, batch, k, backends)
                    except Exception:
                        row = {"n": n, "m": m, "batch": batch, "k": k, "error": traceback.format_exc(limit=3)}
                    report["results"].append(row)
                    save()
                    cells = [row.get("ms", {}).get(name) for name in
                             [f"recjpq:{b}" for b in backends] + ["dense_bf16", "split_loop"] + decode_columns]
                    print(f"{n:>9} {m:>3} {batch:>5} {k:>4} " +
                          " ".join(f"{c:>16.3f}" if c is not None else f"{'-':>16}" for c in cells), flush=True)
            del cat
            torch.cuda.empty_cache()
    save()
    print("checks:", json.dumps(report["checks"]))
    print("wrote", path)


if __name__ == "__main__":
    main()
