"""Packed int64 top-k keys: an order-preserving int32 of the float32 score in the high half and
``2**32 - 1 - index`` in the low half, so one integer comparison orders by score, then by lower
index. Shared by the reference backend and the kernels that merge candidates in PyTorch.
"""
from __future__ import annotations

import torch

EMPTY_KEY = torch.iinfo(torch.int64).min  # an excluded or missing item; decodes to (-inf, -1)
_LOW = (1 << 32) - 1


def ordered_int32(scores: torch.Tensor) -> torch.Tensor:
    """Map float32 to int32 so that integer order equals float order (-0.0 folded into +0.0)."""
    bits = (scores.float() + 0.0).view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def pack_keys(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return (ordered_int32(scores).long() << 32) | (_LOW - ids.long())


def unpack_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (descending) -> (values float32, indices int64); empty keys become (-inf, -1)."""
    high = (keys >> 32).int()
    values = torch.where(high >= 0, high, high ^ 0x7FFFFFFF).view(torch.float32)
    indices = _LOW - (keys & _LOW)
    empty = keys == EMPTY_KEY
    values = values.masked_fill(empty, float("-inf"))
    indices = indices.masked_fill(empty, -1)
    return values, indices
