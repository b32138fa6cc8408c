"""``recjpq train`` under torchrun: DDP for the sequence model, optionally a sharded output layer.

Every rank builds the same model (same seed, same codes), and each global batch of
``batch_size`` sequences is split into contiguous per-rank chunks. Without catalogue sharding
each rank computes the usual loss on its chunk and DDP averages the gradients. With
``shard_catalogue`` each rank gathers all ranks' rows and scores them against its 1/W of the
items (``recjpq.distributed.softmax_cross_entropy``); the loss is then the mean over the whole
global batch, the gradients each rank computes are shares of its gradient, and DDP sums them
(a comm hook) instead of averaging, so a step equals a single-process step on the global batch.
Validation runs on rank 0 and its metrics are broadcast, so every rank takes the same
early-stopping decisions.
"""
from __future__ import annotations

import atexit
import functools
import os

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from recjpq.distributed.catalogue import CatalogueShard
from recjpq.distributed.cross_entropy import softmax_cross_entropy as sharded_softmax_cross_entropy
from recjpq.models import softmax_cross_entropy
from recjpq.training import training_loss


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """True outside torch.distributed and on rank 0: the process that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_from_env(device: str) -> str:
    """Join the process group when started by torchrun (``WORLD_SIZE`` > 1 in the environment):
    NCCL for CUDA devices, gloo otherwise. Returns the device this rank trains on
    (``cuda:LOCAL_RANK`` for a CUDA device, else ``device`` unchanged)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return device
    backend = "gloo"
    if torch.device(device).type == "cuda":
        device, backend = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}", "nccl"
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return device


def _allreduce_sum_hook(group, bucket):  # no annotations: DDP insists on the real GradBucket class, not a string
    """DDP comm hook: sum the gradients over ranks (DDP's default averages them)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class _TrainingLoss(nn.Module):
    """The training loss as a module, so that DDP wraps the whole step (encoder and loss)."""

    def __init__(self, model, config, ce, rng: np.random.Generator, generator: torch.Generator):
        super().__init__()
        self.model, self.config, self.ce, self.rng, self.generator = model, config, ce, rng, generator

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        return training_loss(self.model, seqs, self.config, self.rng, self.generator, ce=self.ce)


class DataParallel:
    """What ``recjpq.training.fit`` does differently on each rank of a torchrun job."""

    def __init__(self, model, config):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        ce = softmax_cross_entropy
        if config.shard_catalogue:
            # a group of its own, so that its collectives never interleave with DDP's bucket all_reduces
            shard = CatalogueShard.from_codes(model.item_embedding.codes[1:], group=dist.new_group())
            ce = functools.partial(sharded_softmax_cross_entropy, shard=shard)
        # masking (BERT4Rec) and negatives differ per rank; the batch order (fit's rng) does not
        rng = np.random.default_rng((config.seed, self.rank))
        generator = torch.Generator(device=config.device).manual_seed(int(rng.integers(1 << 62)))
        device = torch.device(config.device)
        self.module = DistributedDataParallel(_TrainingLoss(model, config, ce, rng, generator),
                                              device_ids=[device] if device.type == "cuda" else None,
                                              forward_sync_buffers=False)  # the codes are the same everywhere
        if config.shard_catalogue:
            self.module.register_comm_hook(None, _allreduce_sum_hook)

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """This rank's contiguous chunk of a global batch's sequence indices."""
        return np.array_split(idx, self.world_size)[self.rank]

    def loss(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.module(seqs)

    def on_main(self, fn):
        """``fn()`` computed on rank 0, returned on every rank."""
        box = [fn() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]
