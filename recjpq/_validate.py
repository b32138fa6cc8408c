"""Argument checks shared by every op: they run in Python before any backend launches.

Shape, dtype and device checks are trace-friendly (they only read metadata), so they also
run under ``torch.compile``. Value checks (code range, finite S, exclusion ids) read data and
run inside the op implementations, once per codes tensor where the result can be cached.
"""
from __future__ import annotations

import math
import os

import torch

CODE_DTYPES = (torch.uint8, torch.int16, torch.int32)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, *, ndim: int | None = None, dtypes=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {x.dtype}")


def check_same_device(**tensors) -> None:
    """Non-tensors are skipped: their own check says what they should be."""
    named = [(n, t) for n, t in tensors.items() if isinstance(t, torch.Tensor)]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all inputs must be on one device")


def check_codes(codes, num_codes: int | None = None) -> None:
    """Metadata checks on a codes tensor ``[N, M]``."""
    check_tensor("codes", codes, ndim=2, dtypes=CODE_DTYPES)
    if codes.shape[0] == 0 or codes.shape[1] == 0:
        raise ValueError(f"codes must be non-empty, got shape {tuple(codes.shape)}")
    if num_codes is not None and codes.dtype == torch.uint8 and num_codes > 256:
        raise ValueError(f"uint8 codes hold at most 256 sub-ids, but K={num_codes}; use int16 or int32 codes")


def check_table(S, codes) -> None:
    """Metadata checks on S ``[B, M, K]`` against codes ``[N, M]``."""
    check_tensor("S", S, ndim=3, dtypes=FLOAT_DTYPES)
    check_codes(codes, S.shape[2])
    check_same_device(S=S, codes=codes)
    if S.shape[1] != codes.shape[1]:
        raise ValueError(f"S has M={S.shape[1]} splits but codes has M={codes.shape[1]}")
    if S.shape[0] == 0 or S.shape[2] == 0:
        raise ValueError(f"S must have B >= 1 and K >= 1, got shape {tuple(S.shape)}")


def check_topk_args(S, codes, k, exclude) -> None:
    check_table(S, codes)
    check_k_exclude(k, codes.shape[0], exclude, S)


def check_k_exclude(k, n: int, exclude, S) -> None:
    """k and exclude for a top-k over N items, S ``[B, M, K]`` having passed ``check_table``."""
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k <= 0 or k > n:
        raise ValueError(f"k must be in [1, N={n}], got k={k}")
    if exclude is not None:
        check_tensor("exclude", exclude, ndim=2, dtypes=(torch.int64,))
        check_same_device(S=S, exclude=exclude)
        if exclude.shape[0] != S.shape[0]:
            raise ValueError(f"exclude has {exclude.shape[0]} rows but S has B={S.shape[0]} queries")


def device_checks_mode() -> str:
    """``RECJPQ_DEVICE_CHECKS``: how ``check_values`` checks S and ``exclude`` on a GPU.

    "async" (default): device-side assertions, no host synchronisation (a B = 1 top-k costs
    about as much as the 1-3 syncs it saves, and syncs block CUDA graph capture); a bad value
    fails as a device-side assert at the next sync, which leaves the CUDA context unusable.
    "sync": the CPU behaviour, a ValueError before the launch. "off": no S / exclude data checks.
    Either way the kernels stay memory-safe: they never use S or exclusion values as addresses.
    Code ranges are checked once per codes tensor in every mode.
    """
    mode = os.environ.get("RECJPQ_DEVICE_CHECKS", "async")
    if mode not in ("async", "sync", "off"):
        raise ValueError(f"RECJPQ_DEVICE_CHECKS must be async, sync or off, got {mode!r}")
    return mode


def check_values_on_device(S, n: int, exclude=None) -> None:
    """``check_values``'s S and exclusion checks as device-side assertions: no host sync."""
    torch._assert_async(torch.isfinite(S).all(), "S contains non-finite values (nan or inf)")
    if exclude is not None and exclude.numel():
        torch._assert_async(((exclude >= -1) & (exclude < n)).all(), f"exclude ids must be in [-1, N={n})")


def check_values(S, codes, exclude=None, *, finite: bool = False) -> None:
    """Data checks; code ranges are checked once per codes tensor (see ``_codes_cache``). Off
    the CPU, S and exclusions are checked as ``device_checks_mode`` says. ``finite=True``: the
    caller has proved S finite (the decoded-table path bounds |S|)."""
    from recjpq._codes_cache import codes_info

    mode = "sync" if S.device.type == "cpu" else device_checks_mode()
    if mode != "sync":
        codes_info(codes).check_range(S.shape[2])
        if mode == "async":
            check_values_on_device(S, codes.shape[0], exclude)
        return
    # one reduction instead of a mask: a finite sum proves every entry finite; only an overflowing
    # (or non-finite) sum needs the elementwise test
    if not finite and not math.isfinite(float(S.detach().sum())) and not bool(torch.isfinite(S).all()):
        raise ValueError("S contains non-finite values (nan or inf)")
    codes_info(codes).check_range(S.shape[2])
    if exclude is not None and exclude.numel():
        lo, hi = int(exclude.min()), int(exclude.max())
        if lo < -1 or hi >= codes.shape[0]:
            raise ValueError(f"exclude ids must be in [-1, N={codes.shape[0]}), got values in [{lo}, {hi}]")
