"""Per-codes-tensor facts computed once: the largest code, and backend-prepared layouts.

Scanning N x M codes to check their range costs as much as a B=1 top-k, so it is cached
against the tensor's storage, shape and in-place version counter; an in-place edit of the
codes invalidates the entry.
"""
from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary


class CodesInfo:
    def __init__(self, codes: torch.Tensor):
        self._key = _key(codes)
        self._max_code: int | None = None
        self._min_code: int | None = None
        self.prepared: dict = {}  # backend name -> prepared layout (e.g. blocked codes, inverted index)

    def check_range(self, num_codes: int) -> None:
        if self._max_code is None:
            raise RuntimeError("CodesInfo used before its tensor was scanned")
        if self._min_code < 0 or self._max_code >= num_codes:
            raise ValueError(f"codes must lie in [0, K={num_codes}), got values in "
                             f"[{self._min_code}, {self._max_code}]")

    def _scan(self, codes: torch.Tensor) -> None:
        self._min_code = int(codes.min())
        self._max_code = int(codes.max())


_CACHE = WeakIdKeyDictionary()  # tensors compare elementwise, so key on identity


def _key(codes: torch.Tensor):
    return (codes.data_ptr(), tuple(codes.shape), tuple(codes.stride()), codes.dtype, codes.device, codes._version)


def codes_info(codes: torch.Tensor) -> CodesInfo:
    """The cached facts for ``codes``, recomputed if the tensor changed since."""
    info = _CACHE.get(codes)
    if info is None or info._key != _key(codes):
        info = CodesInfo(codes)
        info._scan(codes)
        _CACHE[codes] = info
    return info
