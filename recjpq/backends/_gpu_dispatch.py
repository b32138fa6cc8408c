"""Per-shape choice between the "triton" and "cuda" backends on CUDA tensors, from measured times.

``gpu_dispatch.json`` is written on a GPU by ``bench/cuda_dispatch_table.py``: for each measured
shape (op, B, N, M, k) the milliseconds of each backend. A call takes the fastest available
backend at the nearest measured shape (distance in log2 of each size); with no measurement for
the op, the registry's default order applies. Backends that cannot run the shape at all (a
module's ``shape_unsupported(op, shape, device)`` gives a reason) drop out first.
"""
from __future__ import annotations

import functools
import json
import math
import os

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_dispatch.json")
_SIZES = ("B", "N", "M", "k")


@functools.cache
def measured_entries() -> tuple[dict, ...]:
    with open(TABLE_PATH) as f:
        return tuple(json.load(f)["entries"])


def _distance(entry: dict, shape: dict) -> float:
    return sum(abs(math.log2(entry[s]) - math.log2(shape[s])) for s in _SIZES if s in entry and s in shape)


def preferred(op: str, shape: dict, available: list[str], entries=None) -> str | None:
    """The fastest of ``available`` at the measured shape nearest ``shape``, or None if unmeasured."""
    entries = measured_entries() if entries is None else entries
    timed = [e for e in entries if e["op"] == op and any(name in e["ms"] for name in available)]
    if not timed:
        return None
    nearest = min(timed, key=lambda e: _distance(e, shape))
    return min((name for name in available if name in nearest["ms"]), key=nearest["ms"].get)


def order(op: str, shape: dict, device, names: list[str]) -> list[str]:
    """``names`` (available backends, default order) without those that cannot run ``shape``,
    the measured fastest first."""
    from recjpq import backends

    def runs(name: str) -> bool:
        check = getattr(backends.get(name), "shape_unsupported", None)
        return check is None or check(op, shape, device) is None

    names = [n for n in names if runs(n)]
    choice = preferred(op, shape, [n for n in names if n in ("cuda", "triton")])
    return names if choice is None else [choice] + [n for n in names if n != choice]
