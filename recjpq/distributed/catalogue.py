"""A catalogue split into contiguous row ranges, one per rank of a process group.

Rank r holds the codes of global items ``bounds[r][0] <= i < bounds[r][1]``; the ranges tile
``[0, N)`` in rank order, so a local item id plus the shard's ``start`` is the global id. The
sub-item tables (S, or the sub-item embeddings behind it) are small and stay replicated.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from recjpq._validate import check_codes

MAX_ITEMS = 1 << 32  # global ids must fit the low half of the packed top-k keys (recjpq.topk_keys)


def even_bounds(num_items: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous ``(start, end)`` ranges over ``num_items`` items, sizes differing by at most one
    (the first ``num_items % world_size`` ranks hold one item more)."""
    for name, value in (("num_items", num_items), ("world_size", world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if num_items < world_size:
        raise ValueError(f"cannot give each of {world_size} ranks an item of a catalogue of {num_items}")
    base, extra = divmod(num_items, world_size)
    bounds, start = [], 0
    for r in range(world_size):
        end = start + base + (r < extra)
        bounds.append((start, end))
        start = end
    return bounds


def _check_bounds(bounds, num_items: int, world_size: int) -> list[tuple[int, int]]:
    bounds = [(int(s), int(e)) for s, e in bounds]
    if len(bounds) != world_size:
        raise ValueError(f"bounds must have one (start, end) per rank ({world_size}), got {len(bounds)}")
    expected_start = 0
    for r, (start, end) in enumerate(bounds):
        if start != expected_start or end <= start:
            raise ValueError(f"bounds must be non-empty ranges tiling [0, {num_items}) in rank order; rank {r} "
                             f"has [{start}, {end}) where a range starting at {expected_start} was expected")
        expected_start = end
    if expected_start != num_items:
        raise ValueError(f"bounds end at {expected_start} but the catalogue has {num_items} items")
    return bounds


def _require_process_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("CatalogueShard needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group, or run under torchrun)")


class CatalogueShard:
    """This rank's rows of a catalogue's codes, and where every rank's rows lie.

    Build it with ``from_codes`` when every rank can see the whole codes tensor (each keeps a view
    of its rows), or directly from the local rows when each rank loads only its own: then one
    all_gather checks that the shards tile the catalogue. ``group`` is the process group the
    collectives run on (None: the default group).
    """

    def __init__(self, codes: torch.Tensor, start: int, num_items: int, *, group=None):
        check_codes(codes)
        _require_process_group()
        if not 1 <= num_items < MAX_ITEMS:
            raise ValueError(f"num_items must be in [1, 2**32), got {num_items}")
        self.codes = codes.contiguous()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.num_items = int(num_items)
        mine = torch.tensor([int(start), int(start) + codes.shape[0], codes.shape[1]])
        if dist.get_backend(group) == dist.Backend.NCCL:
            mine = mine.to(codes.device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine, group=group)
        splits = {int(t[2]) for t in every}
        if len(splits) != 1:
            raise ValueError(f"every rank's codes must have the same M, got {sorted(splits)}")
        self.bounds = _check_bounds([(t[0], t[1]) for t in every], self.num_items, self.world_size)
        self.start, self.end = self.bounds[self.rank]

    @classmethod
    def from_codes(cls, codes: torch.Tensor, *, bounds=None, group=None) -> "CatalogueShard":
        """This rank's shard of the global ``codes [N, M]`` (a view, no copy). ``bounds``: one
        ``(start, end)`` per rank tiling ``[0, N)``; default ``even_bounds(N, world_size)``."""
        check_codes(codes)
        _require_process_group()
        world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        n = codes.shape[0]
        bounds = even_bounds(n, world_size) if bounds is None else _check_bounds(bounds, n, world_size)
        start, end = bounds[rank]
        return cls(codes[start:end], start, n, group=group)

    @property
    def num_splits(self) -> int:
        return self.codes.shape[1]

    def __repr__(self) -> str:
        return (f"CatalogueShard(rank={self.rank}/{self.world_size}, items=[{self.start}, {self.end}) of "
                f"{self.num_items}, M={self.num_splits})")
