"""Bounded loopback load test of ``recjpq serve``: micro-batching on vs off.

    python bench/serve_load.py                 # 1M items, 64 clients, 2 x (2 s warm-up + 10 s)

Builds an untrained RecJPQ SASRec over a synthetic catalogue (throughput does not depend on the
weights), starts ``recjpq serve`` as a subprocess on a free 127.0.0.1 port once with batching and
once without, and drives it with ``--clients`` concurrent keep-alive connections, each sending
``POST /recommend`` (k=10, exclude_seen) with histories from ``recjpq.data.generate_sequences``.
The client is a minimal asyncio HTTP/1.1 loop (not httpx) so it takes as little of the shared
CPU as possible. Load phases last ``2 * (warmup + seconds)`` <= 30 s; then everything stops.
Writes bench/results/serve_load.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.peers import machine  # noqa: E402
from recjpq import backends  # noqa: E402
from recjpq.checkpoint import save_checkpoint  # noqa: E402
from recjpq.codes import codes_dtype  # noqa: E402
from recjpq.data import generate_sequences  # noqa: E402
from recjpq.models import build_model  # noqa: E402

MAX_LOAD_SECONDS = 30
MODEL = dict(dim=64, num_codes=256, num_layers=2, num_heads=1, dropout=0.0, max_len=50)
SPLITS, K = 8, 10


def _checkpoint(path: str, num_items: int) -> None:
    torch.manual_seed(0)
    codes = torch.randint(0, MODEL["num_codes"], (num_items + 1, SPLITS)).to(codes_dtype(MODEL["num_codes"]))
    model = build_model("sasrec", num_items, codes=codes, item_embedding="recjpq", **MODEL)
    save_checkpoint(path, model)  # no item_ids: raw ids are the model ids 1..num_items


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(checkpoint: str, port: int, batching: bool, args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recjpq", "serve", checkpoint, "--host", "127.0.0.1", "--port", str(port),
           "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms), "--log-level", "warning"]
    if not batching:
        cmd.append("--no-batching")
    proc = subprocess.Popen(cmd)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not come up in 120 s")


def _prime(port: int, body: bytes) -> None:
    """One request before the load: builds the kernels' per-codes layouts outside the timing."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/recommend", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        r.read()


async def _post(reader, writer, body: bytes) -> int:
    writer.write(b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _load(port: int, bodies: list[bytes], clients: int, warmup: float, seconds: float) -> dict:
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + seconds
    latencies, errors = [], 0

    async def client(seed: int):
        nonlocal errors
        rng = random.Random(seed)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (sent := time.perf_counter()) < stop_at:
                status = await _post(reader, writer, rng.choice(bodies))
                done = time.perf_counter()
                if sent >= measure_from:
                    latencies.append(done - sent)
                    errors += status != 200
        finally:
            writer.close()

    await asyncio.wait_for(asyncio.gather(*(client(i) for i in range(clients))), warmup + seconds + 60)
    if not latencies:
        raise RuntimeError("no request completed in the measured window; lengthen --seconds")
    lat_ms = np.asarray(latencies) * 1e3
    return {"requests": len(latencies), "errors": errors, "seconds": seconds,
            "throughput_rps": round(len(latencies) / seconds, 1),
            "p50_ms": round(float(np.percentile(lat_ms, 50)), 2), "p99_ms": round(float(np.percentile(lat_ms, 99)), 2),
            "mean_ms": round(float(lat_ms.mean()), 2)}


def _batch_sizes(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("recjpq_batch_size_sum") or line.startswith("recjpq_batch_size_count")}
    count = values["recjpq_batch_size_count"]
    return {"batches": int(count), "mean_batch_size": round(values["recjpq_batch_size_sum"] / count, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per mode")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds of load per mode")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_load.json"))
    args = p.parse_args()
    if 2 * (args.warmup + args.seconds) > MAX_LOAD_SECONDS:
        p.error(f"2 * (warmup + seconds) must stay within {MAX_LOAD_SECONDS} s")

    data = generate_sequences(num_users=4096, num_items=args.items, mean_length=30, seed=1)
    bodies = [json.dumps({"history": seq.tolist(), "k": K, "exclude_seen": True}).encode()
              for seq in data.sequences]
    results = {"items": args.items, "clients": args.clients, "k": K, "model": {"name": "sasrec", "splits": SPLITS,
               **MODEL, "weights": "untrained (random init)"},
               "history_length_mean": round(float(np.mean([len(s) for s in data.sequences])), 1),
               "backend": backends.resolve(None, torch.device("cpu"), "pq_topk",
                                           {"B": args.max_batch, "N": args.items + 1, "M": SPLITS,
                                            "K": MODEL["num_codes"], "k": K}),
               "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
               "load_average_at_start": os.getloadavg(), "machine": machine(), "modes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "sasrec_recjpq.pt")
        _checkpoint(checkpoint, args.items)
        for mode, batching in (("batching_on", True), ("batching_off", False)):
            port = _free_port()
            server = _start_server(checkpoint, port, batching, args)
            try:
                _prime(port, bodies[0])
                run = asyncio.run(_load(port, bodies, args.clients, args.warmup, args.seconds))
                run.update(_batch_sizes(port))
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(60)
            results["modes"][mode] = run
            print(mode, json.dumps(run), flush=True)
    on, off = results["modes"]["batching_on"], results["modes"]["batching_off"]
    results["throughput_ratio_on_vs_off"] = round(on["throughput_rps"] / off["throughput_rps"], 2)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}: throughput x{results['throughput_ratio_on_vs_off']} with micro-batching")


if __name__ == "__main__":
    main()
