"""Training with AdamW and early stopping on validation NDCG@10, from a leave-one-out split.

Codes for RecJPQ are assigned from the TRAINING interactions only (validation and test items
never leak into them). The best validation state is restored before the test evaluation.
"""
from __future__ import annotations

import copy
import functools
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from recjpq import codes as codes_lib
from recjpq.data import (LeaveOneOut, SequenceData, batches, leave_one_out, length_batches, pad_left,
                         train_interactions)
from recjpq.evaluation import evaluate
from recjpq.models import (EMBEDDINGS, LOSSES, MODELS, SequentialRecommender, build_model, gbce,
                           sample_negatives, sampled_bce, softmax_cross_entropy)


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in checkpoints and ``metrics.json``.

    ``codes`` is any ``recjpq.codes.STRATEGIES`` name. ``num_layers``/``num_heads`` of None
    keep the model's defaults. ``patience`` counts validations without improvement;
    ``max_steps`` and ``time_limit`` (seconds) cap training (CI, benchmarks). ``backend``
    pins the ``recjpq.backends`` that RecJPQ scoring runs on (None: the fastest available).
    ``bucket_by_length`` batches sequences of similar length (``recjpq.data.length_batches``);
    with it, SASRec and BERT4Rec, which pad each batch only to its longest sequence, skip most
    of the padding on data with short histories. ``shard_catalogue`` (under torchrun, RecJPQ
    with loss 'ce') splits the output layer's items over the ranks (see
    ``recjpq.distributed.training``); with one process it changes nothing.
    """

    model: str = "sasrec"
    embedding: str = "dense"
    codes: str = "svd"
    splits: int = 8
    num_codes: int = 256
    dim: int = 64
    num_layers: int | None = None
    num_heads: int | None = None
    dropout: float = 0.2
    max_len: int = 200
    loss: str = "ce"
    negatives: int = 256
    gbce_t: float = 0.75
    batch_size: int = 128
    bucket_by_length: bool = False
    lr: float = 1e-3
    weight_decay: float = 0.01
    epochs: int = 100
    patience: int = 5
    eval_every: int = 1
    valid_users: int | None = None
    exclude_seen: bool = False
    max_steps: int | None = None
    time_limit: float | None = None
    seed: int = 0
    device: str = "cpu"
    backend: str | None = None
    shard_catalogue: bool = False

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {tuple(MODELS)}, got {self.model!r}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {self.embedding!r}")
        if self.embedding == "recjpq" and self.codes not in codes_lib.STRATEGIES:
            raise ValueError(f"codes must be one of {codes_lib.STRATEGIES}, got {self.codes!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.model == "bert4rec" and self.loss != "ce":
            raise ValueError("bert4rec trains with loss='ce' (masked-item softmax)")
        if self.shard_catalogue and (self.embedding != "recjpq" or self.loss != "ce"):
            raise ValueError("shard_catalogue needs embedding='recjpq' and loss='ce'")
        for name in ("splits", "num_codes", "dim", "max_len", "negatives", "batch_size", "epochs", "patience",
                     "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class TrainResult:
    model: SequentialRecommender
    config: TrainConfig
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    valid: dict = field(default_factory=dict)
    test: dict = field(default_factory=dict)
    train_seconds: float = 0.0

    def summary(self) -> dict:
        """The ``metrics.json`` content: test metrics at top level, then the run's details."""
        return {**self.test, "valid": self.valid, "best_epoch": self.best_epoch,
                "train_seconds": round(self.train_seconds, 2),
                "item_embedding_params": self.model.item_embedding_parameters(),
                "dense_item_embedding_params": (self.model.num_items + 1) * self.config.dim,
                "total_params": sum(p.numel() for p in self.model.parameters()),
                "config": asdict(self.config), "history": self.history}


def build(config: TrainConfig, split: LeaveOneOut, num_items: int) -> SequentialRecommender:
    """The untrained model, with codes from the training interactions when RecJPQ."""
    codes = None
    if config.embedding == "recjpq":
        codes = codes_lib.assign_codes(train_interactions(split.train), num_items + 1, config.splits,
                                       config.num_codes, strategy=config.codes, seed=config.seed)
    kwargs = dict(dim=config.dim, item_embedding=config.embedding, num_codes=config.num_codes,
                  dropout=config.dropout, max_len=config.max_len)
    if config.num_layers is not None:
        kwargs["num_layers"] = config.num_layers
    if config.num_heads is not None and config.model != "gru4rec":
        kwargs["num_heads"] = config.num_heads
    model = build_model(config.model, num_items, codes=codes, **kwargs).to(config.device)
    model.ops_backend = config.backend
    return model


def training_loss(model: SequentialRecommender, seqs: torch.Tensor, config: TrainConfig,
                  rng: np.random.Generator, generator: torch.Generator, ce=softmax_cross_entropy) -> torch.Tensor:
    """``ce(scorer, hidden, targets)`` computes loss 'ce' (recjpq.distributed swaps in a sharded one)."""
    inputs, targets = model.training_example(seqs, rng)
    hidden = model.encode(inputs)
    has_target = targets != 0
    hidden, targets = hidden[has_target], targets[has_target]
    if config.loss == "ce":
        return ce(model.scorer, hidden, targets)
    negatives = sample_negatives(targets, model.num_items, config.negatives, generator)
    if config.loss == "bce":
        return sampled_bce(model.scorer, hidden, targets, negatives)
    return gbce(model.scorer, hidden, targets, negatives, model.num_items, config.gbce_t)


def fit(data: SequenceData, config: TrainConfig, *, progress: bool = True,
        log_epochs: bool | None = None) -> TrainResult:
    """Split ``data`` leave-one-out, train, keep the best validation state, evaluate on test.

    ``progress`` shows tqdm bars (loss, sequences/s); ``log_epochs`` (default: same as
    ``progress``) prints one line per epoch with the loss and validation metrics.
    """
    from recjpq.distributed.training import DataParallel, is_distributed, is_main  # it imports this module

    log_epochs = progress if log_epochs is None else log_epochs
    config.validate()
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator(device=config.device).manual_seed(config.seed)
    split = leave_one_out(data.sequences)
    model = build(config, split, data.num_items)
    parallel = None  # under torchrun: DDP, per-rank batch chunks, validation on rank 0
    if is_distributed():
        parallel = DataParallel(model, config)
        progress, log_epochs = (progress, log_epochs) if is_main() else (False, False)
    causal = config.model != "bert4rec"
    # causal models need a next item to predict; they see max_len inputs plus one target
    train = [s for s in split.train if len(s) >= (2 if causal else 1)]
    width = config.max_len + (1 if causal else 0)
    lengths = [min(len(s), width) for s in train]  # for bucket_by_length
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    result = TrainResult(model, config)
    best_state, best_score, stale, step = None, -1.0, 0, 0
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = (length_batches(lengths, config.batch_size, rng) if config.bucket_by_length
                 else list(batches(len(train), config.batch_size, rng)))
        bar = tqdm(order, desc=f"epoch {epoch}",
                   disable=None if progress else True, leave=False)  # None: no bar off a terminal (logs, CI)
        epoch_loss, seen, epoch_start, done = 0.0, 0, time.perf_counter(), False
        for idx in bar:
            if parallel is not None and len(idx) < parallel.world_size:
                continue  # a last batch too small to give every rank a sequence
            rows = [train[j] for j in (idx if parallel is None else parallel.rows(idx))]
            seqs = pad_left(rows, model.batch_width(rows, width)).to(config.device)
            loss = training_loss(model, seqs, config, rng, generator) if parallel is None else parallel.loss(seqs)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            seen += len(idx)
            value = loss.item()
            epoch_loss += value * len(idx)
            bar.set_postfix(loss=f"{value:.4f}", seq_per_s=f"{seen / (time.perf_counter() - epoch_start):.0f}")
            done = ((config.max_steps is not None and step >= config.max_steps)
                    or (config.time_limit is not None and time.perf_counter() - start >= config.time_limit))
            if done:
                break
        record = {"epoch": epoch, "loss": epoch_loss / max(seen, 1), "seconds": round(time.perf_counter() - start, 2)}
        if epoch % config.eval_every == 0 or done or epoch == config.epochs:
            validate = functools.partial(evaluate, model, split.valid, exclude_seen=config.exclude_seen,
                                         max_users=config.valid_users)
            record.update(validate() if parallel is None else parallel.on_main(validate))
            if record["ndcg@10"] > best_score:
                best_score, stale, result.best_epoch = record["ndcg@10"], 0, epoch
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
        result.history.append(record)
        if log_epochs:
            tqdm.write(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        if done or stale >= config.patience:
            break
    result.train_seconds = time.perf_counter() - start
    model.load_state_dict(best_state)

    def final():
        return (evaluate(model, split.valid, exclude_seen=config.exclude_seen),
                evaluate(model, split.test, exclude_seen=config.exclude_seen))

    result.valid, result.test = final() if parallel is None else parallel.on_main(final)
    return result
