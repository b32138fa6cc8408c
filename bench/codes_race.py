"""Issue 21's crash reproducers: codes that change under an op must never crash the process.

    python bench/codes_race.py                        # A, B and C, 30 s per case and SIMD path
    python bench/codes_race.py --seconds 2 --case A   # a short run (tests/test_codes_snapshot.py)

Each (case, SIMD path) runs in its own subprocess, which loops over the CPU ops (pq_topk with every
algorithm, pq_topk_query, pq_scores, pq_cross_entropy forward and backward) until time is up:

- A: a thread keeps copying two valid uint8 code sets into ``codes`` (``copy_``, which bumps the
  version) while the ops run (it used to corrupt the heap under ``algorithm="prune"``);
- B: the same with int32 codes, alternating a valid set and one holding out-of-range values
  (2**31 - 1 and -7): an op may raise the range error, never read out of bounds (it used to
  SIGSEGV on the exhaustive path);
- C: out-of-range values written through ``codes.numpy()`` and ``codes.data``, which do not bump
  the version counter, between two calls: the second call must answer exactly as the first (the
  snapshot it keeps is stale but safe) or raise; it used to SIGSEGV under ``"prune"``.

A worker that dies from a signal, hangs, or sees a wrong answer fails the run (exit status 1).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CASES = ("A", "B", "C")
SIMD_PATHS = ("scalar", "avx2", "avx512")
N, M, K, TOP = 20_000, 8, 256, 10
OPS = ("topk_exhaustive", "topk_prune", "topk_auto", "topk_query", "scores", "cross_entropy")


def _run_op(name: str, S: torch.Tensor, query: torch.Tensor, centroids: torch.Tensor, codes: torch.Tensor):
    """One op on the cpu backend; returns what it computed (detached) so answers can be compared."""
    from recjpq import ops

    if name.startswith("topk_") and name != "topk_query":
        values, indices = ops.pq_topk(S, codes, TOP, backend="cpu", algorithm=name[len("topk_"):])
        _check_topk(values, indices)
        return values, indices
    if name == "topk_query":
        values, indices = ops.pq_topk_query(query, centroids, codes, TOP, backend="cpu")
        _check_topk(values, indices)
        return values, indices
    if name == "scores":
        return (ops.pq_scores(S, codes, backend="cpu"),)
    S = S.detach().requires_grad_()
    loss = ops.pq_cross_entropy(S, codes, torch.arange(S.shape[0]), backend="cpu")
    loss.backward()
    return loss.detach(), S.grad


def _check_topk(values: torch.Tensor, indices: torch.Tensor) -> None:
    """A top-k from a torn snapshot may mix two code sets, but it is still a well-formed answer."""
    values, indices = values.tolist(), indices.tolist()  # checked in Python: torch calls would queue on the GIL
    for row_values, row_indices in zip(values, indices):
        if not (all(0 <= i < N for i in row_indices) and all(math.isfinite(v) for v in row_values)
                and row_values == sorted(row_values, reverse=True)):
            raise AssertionError(f"malformed top-k: {values} {indices}")


# Errors that stop a call safely: recjpq's range check on its snapshot, torch's bounds check when
# indexing the caller's codes (pq_cross_entropy's target term), autograd's check that tensors saved
# for backward were not modified in place.
SAFE_ERRORS = ("codes must lie in", "out of bounds", "modified by an inplace operation")


def _is_safe_error(e: Exception) -> bool:
    return isinstance(e, (ValueError, RuntimeError, IndexError)) and any(m in str(e) for m in SAFE_ERRORS)


def _safe_call(counts: dict, name: str, *args):
    """``_run_op``, or None after an error listed as safe (counted)."""
    counts["calls"] += 1
    try:
        return _run_op(name, *args)
    except Exception as e:  # noqa: BLE001 (only the errors listed as safe may escape)
        if not _is_safe_error(e):
            raise
        counts["safe_errors"] += 1
        return None


def worker(case: str, simd_paths: list[str], op_names: list[str], seconds: float) -> dict:
    """Loops the ops over racing (A, B) or silently edited (C) codes; raises on a wrong answer."""
    g = torch.Generator().manual_seed(0)
    S = torch.randn(4, M, K, generator=g)
    query, centroids = torch.randn(2, 64, generator=g), torch.randn(M, K, 64 // M, generator=g)
    dtype = torch.uint8 if case == "A" else torch.int32
    first = torch.randint(0, K, (N, M), generator=g).to(dtype)
    second = torch.randint(0, K, (N, M), generator=g).to(dtype)
    if case == "B":
        second[::97, 3] = 2**31 - 1
        second[5::89, 6] = -7
    codes = first.clone()
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            codes.copy_(first)
            if case == "B":  # a window of valid codes, so that some calls also run to the end
                stop.wait(5e-4)
            codes.copy_(second)

    for name in op_names:  # first calls run much Python, which a writer holding the GIL would slow 100-fold
        _run_op(name, S, query, centroids, codes)
    thread = threading.Thread(target=writer, daemon=True)
    sys.setswitchinterval(1e-4)  # hand the GIL back and forth often, so the writer lands inside calls
    if case in ("A", "B"):
        thread.start()
    counts = {"calls": 0, "safe_errors": 0}
    try:
        deadline = time.monotonic() + seconds
        step = 0
        while time.monotonic() < deadline or step < len(op_names) * len(simd_paths):  # every pair at least once
            os.environ["RECJPQ_CPU_SIMD"] = simd_paths[step % len(simd_paths)]
            name = op_names[(step // len(simd_paths)) % len(op_names)]
            step += 1
            if case == "C":
                codes = torch.randint(0, K, (N, M), generator=g, dtype=torch.int32)
                before = _run_op(name, S, query, centroids, codes)
                codes.numpy()[:, 1] = 2**31 - 1  # no version bump: the snapshot cannot know
                codes.data[::7, 5] = -3
                after = _safe_call(counts, name, S, query, centroids, codes)
                if after is not None and any(not torch.equal(a, b) for a, b in zip(before, after)):
                    raise AssertionError(f"{name}: a stale snapshot must keep answering as before")
            else:
                _safe_call(counts, name, S, query, centroids, codes)
    finally:
        stop.set()
        if thread.is_alive():
            thread.join()  # a writer still inside copy_ at interpreter exit would abort the process
    return counts


def run_case(case: str, simd_paths: list[str], op_names: list[str], seconds: float) -> dict:
    """Runs one worker in a subprocess; its exit status says whether the process survived."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--case", case, "--seconds", str(seconds),
           "--simd", *simd_paths, "--ops", *op_names]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, env=env, cwd=ROOT)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", e.stdout or "", e.stderr or ""
    result = {"case": case, "simd": simd_paths, "ops": op_names, "seconds": seconds, "rc": rc,
              "wall_s": round(time.monotonic() - t0, 1)}
    if rc == 0:
        result.update(json.loads(out.strip().splitlines()[-1]))
    else:
        if isinstance(rc, int) and rc < 0:
            result["signal"] = signal.Signals(-rc).name
        result["stderr_tail"] = (err if isinstance(err, str) else err.decode(errors="replace"))[-2000:]
    return result


def available_simd_paths() -> list[str]:
    from recjpq.backends import cpu

    return [level for level in SIMD_PATHS if cpu.simd_supported(level)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--seconds", type=float, default=30.0, help="per case and SIMD path")
    parser.add_argument("--simd", nargs="+", choices=SIMD_PATHS, help="default: every path this CPU has")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="default: all, in turn")
    parser.add_argument("--together", action="store_true",
                        help="one subprocess per case cycling every SIMD path, instead of one per path")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    simd_paths = args.simd or available_simd_paths()
    if args.worker:
        print(json.dumps(worker(args.case[0], simd_paths, args.ops, args.seconds)), flush=True)
        return 0
    groups = [simd_paths] if args.together else [[p] for p in simd_paths]
    failed = False
    for case in args.case:
        for paths in groups:
            result = run_case(case, paths, args.ops, args.seconds)
            failed |= result["rc"] != 0
            print(json.dumps(result), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
