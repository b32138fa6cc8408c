"""Full-softmax cross-entropy over a PQ catalogue: fused ``recjpq.ops.pq_cross_entropy`` against
the materialised loss (``pq_scores`` logits, then ``F.cross_entropy``), forward + backward.

Each variant runs in its own process so peak memory is its own: on CPU the peak resident set
above what the process held before the step (Linux ``VmHWM``, reset through ``clear_refs``), on
CUDA ``max_memory_allocated`` above the inputs. Both variants get one untimed warm-up step on a
few rows (builds cached code layouts), then one timed step at full size.

    python bench/bench_pq_cross_entropy.py --items 1000000 --rows 1024 \\
        --out bench/results/pq_cross_entropy_cpu.json

``--e2e`` instead trains SASRec-RecJPQ (``recjpq.models``) with full softmax, through
``recjpq.models.softmax_cross_entropy`` (this op), on synthetic sequences over ``--items`` items,
and reports sequences/s and the peak resident memory above the built model:

    python bench/bench_pq_cross_entropy.py --e2e --items 1000000 --batch 32 --seq-len 32 \\
        --out bench/results/pq_cross_entropy_e2e_sasrec_cpu.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.peers import machine  # noqa: E402

VARIANTS = ("materialised", "fused")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _loss(variant, S, codes, targets, backend):
    from recjpq import ops

    if variant == "fused":
        return ops.pq_cross_entropy(S, codes, targets, backend=backend)
    return F.cross_entropy(ops.pq_scores(S, codes, backend=backend), targets)


def _step(variant, S, codes, targets, backend):
    loss = _loss(variant, S, codes, targets, backend)
    (grad,) = torch.autograd.grad(loss, S)
    return loss, grad


def run_variant(args) -> dict:
    """One variant in this process: warm-up, then the timed, memory-tracked step."""
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    S = (0.5 * torch.randn(args.rows, args.splits, args.codes, generator=g)).to(device).requires_grad_()
    codes = torch.randint(0, args.codes, (args.items, args.splits), generator=g, dtype=torch.int32)
    codes = codes.to(torch.uint8 if args.codes <= 256 else torch.int32).to(device)
    targets = torch.randint(0, args.items, (args.rows,), generator=g).to(device)
    _step(args.variant, S[:8].detach().requires_grad_(), codes, targets[:8], args.backend)
    memory = _PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    loss, grad = _step(args.variant, S, codes, targets, args.backend)
    peak = memory.peak()  # synchronises first on CUDA
    seconds = time.perf_counter() - start
    return {"variant": args.variant, "seconds": seconds, "peak_bytes": peak, "loss": float(loss),
            "grad_abs_sum": float(grad.abs().sum())}


class _PeakMemory:
    """Peak memory above the moment of ``start()``: CUDA allocator stats, or Linux ``VmHWM``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.before = _rss_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.before
        return _rss_kib("VmHWM") * 1024 - self.before


def run_e2e(args) -> dict:
    """SASRec-RecJPQ training steps with the models' full-softmax loss on synthetic sequences."""
    import numpy as np

    from recjpq.models import SASRec, softmax_cross_entropy

    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, args.codes, (args.items + 1, args.splits), generator=g, dtype=torch.int32)
    codes = codes.to(torch.uint8 if args.codes <= 256 else torch.int32)
    model = SASRec(args.items, dim=args.dim, item_embedding="recjpq", codes=codes, num_codes=args.codes,
                   max_len=args.seq_len).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)

    def train_step():
        seqs = torch.randint(1, args.items + 1, (args.batch, args.seq_len + 1), generator=g).to(device)
        inputs, targets = model.training_example(seqs, rng)
        hidden = model.encode(inputs)
        has_target = targets != 0
        loss = softmax_cross_entropy(model.scorer, hidden[has_target], targets[has_target])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    train_step()  # warm-up: optimizer state, cached code layouts
    memory = _PeakMemory(device)
    memory.start()
    start = time.perf_counter()
    losses = [train_step() for _ in range(args.steps)]
    seconds = time.perf_counter() - start
    return {"model": "SASRec-RecJPQ", "items": args.items, "dim": args.dim, "splits": args.splits,
            "codes": args.codes, "batch": args.batch, "seq_len": args.seq_len,
            "positions_per_step": args.batch * args.seq_len, "steps": args.steps, "seconds": seconds,
            "sequences_per_second": args.steps * args.batch / seconds, "peak_bytes": memory.peak(),
            "losses": losses}


def _machine() -> dict:
    return {**machine(), "load_average_at_start": os.getloadavg()}


def _fits_materialised(args) -> str | None:
    """Why the materialised baseline cannot run here (it needs about 3 x B x N float32), or None."""
    need = 3 * args.rows * args.items * 4
    if args.device == "cuda":
        free = torch.cuda.mem_get_info()[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > 0.9 * free:
        return f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--splits", type=int, default=8)
    p.add_argument("--codes", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=None, help="recjpq backend for both variants (default: the best)")
    p.add_argument("--variant", choices=VARIANTS, help="run one variant in this process and print its JSON")
    p.add_argument("--out", help="where to save the JSON results")
    p.add_argument("--e2e", action="store_true", help="train SASRec-RecJPQ instead (see below)")
    p.add_argument("--batch", type=int, default=32, help="--e2e: sequences per step")
    p.add_argument("--seq-len", type=int, default=32, help="--e2e: positions per sequence")
    p.add_argument("--dim", type=int, default=64, help="--e2e: model dimension")
    p.add_argument("--steps", type=int, default=3, help="--e2e: timed training steps")
    args = p.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args)))
        return
    if args.e2e:
        result = {"machine": _machine()}
        result["end_to_end"] = run_e2e(args)
        _report(result, args.out)
        return
    from recjpq import backends

    backend = backends.resolve(args.backend, torch.device(args.device), "pq_cross_entropy_forward")
    result = {"problem": {"items": args.items, "rows": args.rows, "splits": args.splits, "codes": args.codes,
                          "device": args.device, "backend": backend},
              "machine": _machine(), "runs": {}}
    for variant in VARIANTS:
        skip = _fits_materialised(args) if variant == "materialised" else None
        if skip:
            result["runs"][variant] = {"variant": variant, "skipped": skip}
            continue
        cmd = [sys.executable, __file__, "--variant", variant, "--items", str(args.items), "--rows", str(args.rows),
               "--splits", str(args.splits), "--codes", str(args.codes), "--device", args.device,
               "--backend", backend]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            result["runs"][variant] = {"variant": variant, "failed": out.stderr.strip()[-2000:]}
            continue
        result["runs"][variant] = json.loads(out.stdout.strip().splitlines()[-1])
    runs = result["runs"]
    if all("seconds" in runs[v] for v in VARIANTS):
        result["ratios"] = {
            "peak_memory_materialised_over_fused": runs["materialised"]["peak_bytes"] / runs["fused"]["peak_bytes"],
            "time_materialised_over_fused": runs["materialised"]["seconds"] / runs["fused"]["seconds"],
            "loss_relative_difference": abs(runs["fused"]["loss"] - runs["materialised"]["loss"])
            / abs(runs["materialised"]["loss"]),
        }
    _report(result, args.out)


def _report(result: dict, out: str | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
