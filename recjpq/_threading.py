"""``one_torch_thread``: a block of work on one torch thread, the count restored after."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def one_torch_thread():
    """For work whose result or speed suffers from more threads: reductions whose order follows
    the thread count, or models too small to gain from threads on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
