"""Backend registry: every op runs on one of these, chosen by device (and shape) or by name.

A backend is a module exposing ``unavailable_reason(device) -> str | None`` and the op
implementations it supports (``pq_scores(S, codes)``, ``pq_topk(S, codes, k, exclude, algorithm)``).
Implementations receive validated inputs: S float32 contiguous ``[B, M, K]``, codes contiguous
``[N, M]`` (uint8/int16/int32, in range), exclude int64 contiguous ``[B, E]`` or None, 1 <= k <= N.
"""
from __future__ import annotations

import functools
import importlib

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Preference order per device type when ``backend=None``; the first available one wins.
_AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}


@functools.cache
def get(name: str):
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {name!r}")
    return importlib.import_module(f"recjpq.backends.{name}")


@functools.cache
def _reason(name: str, device_type: str) -> str | None:
    try:
        module = get(name)
    except ImportError as e:  # a compiled part or an optional dependency is missing
        return f"it failed to import ({e})"
    return module.unavailable_reason(torch.device(device_type))


def available(device: torch.device | str) -> list[str]:
    """Names of the backends that can run on ``device``."""
    device_type = torch.device(device).type
    return [n for n in BACKENDS if _reason(n, device_type) is None]


@torch.compiler.assume_constant_result  # a pure function of constants: compiled code keeps its answer
def resolve(backend: str | None, device: torch.device, op: str, shape: dict | None = None) -> str:
    """The backend that runs ``op`` on ``device``: the named one, or the best available.

    ``shape`` (sizes B, N, M, K, k) lets CUDA tensors pick between "cuda" and "triton" from the
    measured table in ``_gpu_dispatch``, skipping a backend that cannot run the shape."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        reason = _reason(backend, device.type)
        if reason is None and not hasattr(get(backend), op):
            reason = f"it does not implement {op}"
        if reason is not None:
            raise RuntimeError(f"backend {backend!r} cannot run {op} on {device.type} tensors: {reason}")
        return backend
    if device.type == "cuda" and shape is not None:
        from recjpq.backends import _gpu_dispatch

        order = _gpu_dispatch.order(op, shape, device, list(_auto_order(device.type, op)))
    else:
        order = _auto_order(device.type, op)
    if order:
        return order[0]
    raise RuntimeError(f"no backend can run {op} on {device.type} tensors")


@functools.cache
def _auto_order(device_type: str, op: str) -> tuple[str, ...]:
    """The available backends implementing ``op``, best first (fixed per process: a B = 1 call
    should not pay for asking again)."""
    return tuple(n for n in _AUTO_ORDER.get(device_type, ("reference",))
                 if _reason(n, device_type) is None and hasattr(get(n), op))
