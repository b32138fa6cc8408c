"""Dynamic micro-batching: concurrent requests share one model forward and one top-k.

Requests wait in a queue; a single worker takes the first, then keeps gathering until the batch
holds ``max_batch`` queries or ``max_wait_s`` has passed, and runs the batch on one dedicated
thread. The kernels release the GIL, so while a batch computes, the event loop keeps parsing
requests and gathering the next batch. ``max_batch=1`` turns batching off: each request runs
alone (the baseline the load benchmark compares against).
"""
from __future__ import annotations

import asyncio
import collections
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional


class BatcherClosed(RuntimeError):
    """The server is shutting down and takes no new work."""


@dataclass
class _Job:
    queries: list
    future: asyncio.Future


class MicroBatcher:
    """Gathers ``submit`` calls into batches for ``run_batch(queries) -> results`` (same order).

    A request never splits: one with more than ``max_batch`` queries runs as a batch of its own.
    ``on_batch(size)`` is called on the event loop for each batch run (metrics).
    """

    def __init__(self, run_batch: Callable[[list], list], *, max_batch: int = 64, max_wait_s: float = 0.002,
                 on_batch: Optional[Callable[[int], None]] = None):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        if not max_wait_s >= 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s!r}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._pending: collections.deque[_Job] = collections.deque()
        self._pending_queries = 0
        self._arrived: Optional[asyncio.Event] = None
        self._closing = False
        self._worker: Optional[asyncio.Task] = None
        self._executor: Optional[ThreadPoolExecutor] = None

    @property
    def pending(self) -> int:
        """Queries waiting for a batch."""
        return self._pending_queries

    async def start(self) -> None:
        self._arrived = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recjpq-batch")
        self._worker = asyncio.create_task(self._work(), name="recjpq-micro-batcher")

    async def stop(self) -> None:
        """Take no new work, finish every queued request, then stop the worker."""
        self._closing = True
        if self._worker is not None:
            self._arrived.set()
            await self._worker
            self._worker = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, queries: list) -> list:
        """The results for ``queries``, computed in some batch."""
        if self._closing or self._worker is None:
            raise BatcherClosed("the server is shutting down")
        job = _Job(queries, asyncio.get_running_loop().create_future())
        self._pending.append(job)
        self._pending_queries += len(queries)
        self._arrived.set()
        return await job.future

    async def _next_batch(self) -> list[_Job]:
        """Jobs for the next batch; empty once closing with nothing queued."""
        loop = asyncio.get_running_loop()
        while not self._pending:
            if self._closing:
                return []
            self._arrived.clear()
            await self._arrived.wait()
        deadline = loop.time() + self.max_wait_s
        while self._pending_queries < self.max_batch and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                break
        jobs = [self._pending.popleft()]
        size = len(jobs[0].queries)
        while self._pending and size + len(self._pending[0].queries) <= self.max_batch:
            job = self._pending.popleft()
            jobs.append(job)
            size += len(job.queries)
        self._pending_queries -= size
        return jobs

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while jobs := await self._next_batch():
            queries = [q for job in jobs for q in job.queries]
            if self.on_batch is not None:
                self.on_batch(len(queries))
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, queries)
            except Exception as e:  # a failed batch fails its requests, never the worker
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            start = 0
            for job in jobs:
                if not job.future.done():  # done = cancelled: the client went away
                    job.future.set_result(results[start:start + len(job.queries)])
                start += len(job.queries)
