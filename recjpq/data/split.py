"""Leave-one-out split and left-padded batches (item id 0 is padding)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

PAD = 0


@dataclass
class EvalSet:
    """One target per user: ``histories[j]`` is what the model sees, ``targets[j]`` what it should rank."""

    histories: list[np.ndarray]
    targets: np.ndarray
    users: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)


@dataclass
class LeaveOneOut:
    """``train[u]``: all but the last two items (all items for users with fewer than 3);
    ``valid``: history = train, target = second-to-last; ``test``: history = all but the last,
    target = last."""

    train: list[np.ndarray]
    valid: EvalSet
    test: EvalSet


def leave_one_out(sequences: list[np.ndarray]) -> LeaveOneOut:
    train, evaluated = [], []
    for u, seq in enumerate(sequences):
        if len(seq) < 3:
            train.append(seq)
        else:
            train.append(seq[:-2])
            evaluated.append(u)
    users = np.asarray(evaluated, dtype=np.int64)
    valid = EvalSet([sequences[u][:-2] for u in users],
                    np.asarray([sequences[u][-2] for u in users], dtype=np.int64), users)
    test = EvalSet([sequences[u][:-1] for u in users],
                   np.asarray([sequences[u][-1] for u in users], dtype=np.int64), users)
    return LeaveOneOut(train, valid, test)


def train_interactions(train: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(user_ids, item_ids)`` of the training items, for code assignment."""
    users = np.repeat(np.arange(len(train)), [len(s) for s in train])
    items = np.concatenate(train) if train else np.zeros(0, dtype=np.int64)
    return users, items


def pad_left(sequences, max_len: int) -> torch.Tensor:
    """The last ``max_len`` items of each sequence, left-padded with 0 -> int64 ``[B, max_len]``."""
    out = np.zeros((len(sequences), max_len), dtype=np.int64)
    for row, seq in enumerate(sequences):
        tail = np.asarray(seq[-max_len:], dtype=np.int64)
        if len(tail):
            out[row, max_len - len(tail):] = tail
    return torch.from_numpy(out)


def batches(num: int, batch_size: int, generator: np.random.Generator | None = None):
    """Index batches over ``range(num)``, shuffled when a generator is given."""
    order = np.arange(num) if generator is None else generator.permutation(num)
    for start in range(0, num, batch_size):
        yield order[start:start + batch_size]


def length_batches(lengths, batch_size: int, generator: np.random.Generator, pool: int = 50) -> list[np.ndarray]:
    """Shuffled index batches of sequences of similar length, so a batch padded to its longest
    sequence carries little padding. Indices are shuffled, cut into pools of ``pool`` batches,
    each pool sorted by length and cut into batches, and the batches shuffled: every index once,
    and batches still mix users from the whole data."""
    lengths = np.asarray(lengths)
    order = generator.permutation(len(lengths))
    out = []
    for start in range(0, len(order), pool * batch_size):
        chunk = order[start:start + pool * batch_size]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        out.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    return [out[i] for i in generator.permutation(len(out))]
