"""Train/test files of the LightGCN splits (Gowalla, Yelp2018, Amazon-Book): ``user item item ...``
lines with 0-based ids."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class CFData:
    """Training pairs (int64 arrays, unique, sorted by user) and the test items as a CSR matrix."""

    train_users: np.ndarray
    train_items: np.ndarray
    test: sp.csr_matrix
    num_users: int
    num_items: int

    @property
    def train(self) -> sp.csr_matrix:
        ones = np.ones(self.train_users.size, dtype=np.float32)
        return sp.csr_matrix((ones, (self.train_users, self.train_items)), shape=(self.num_users, self.num_items))


def _read_lines(path: str) -> tuple[np.ndarray, np.ndarray]:
    users, items = [], []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                ids = [int(x) for x in parts]
            except ValueError:
                raise ValueError(f"{path}:{number}: expected integer ids 'user item item ...', got {line.strip()!r}")
            if min(ids) < 0:
                raise ValueError(f"{path}:{number}: ids must be >= 0 (0-based), got {min(ids)}")
            users.extend([ids[0]] * (len(ids) - 1))
            items.extend(ids[1:])
    return np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64)


def load_cf(directory: str) -> CFData:
    """``directory/train.txt`` and ``directory/test.txt``; repeated pairs count once."""
    paths = [os.path.join(directory, name) for name in ("train.txt", "test.txt")]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: expected the LightGCN split layout (train.txt, test.txt)")
    (tu, ti), (su, si) = (_read_lines(p) for p in paths)
    if tu.size == 0:
        raise ValueError(f"{paths[0]} holds no (user, item) pairs")
    num_users = int(max(tu.max(), su.max(initial=0))) + 1
    num_items = int(max(ti.max(), si.max(initial=0))) + 1
    pairs = np.unique(tu * num_items + ti)
    test = sp.csr_matrix((np.ones(su.size, dtype=np.float32), (su, si)), shape=(num_users, num_items))
    test.sum_duplicates()
    test.data[:] = 1.0
    return CFData(pairs // num_items, pairs % num_items, test, num_users, num_items)
