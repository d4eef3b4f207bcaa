"""Dynamic batching: concurrent requests share one forward pass.

The services clipbatch descends from ran one forward pass per item. Here each request
puts its items in a queue; one thread takes the first waiting request, then gathers
more for at most ``max_wait_s`` or until ``max_items``, runs the model once over all of
them, and hands each request its slice. A lone request waits ``max_wait_s`` at most; 32
clients at once share a few passes instead of making 32.

Example::

    batcher = DynamicBatcher(lambda texts: model.encode_texts(texts)[0], max_items=64)
    vectors = batcher.submit(["a red circle"]).result()
    batcher.close()
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Job(Generic[T]):
    items: list[T]
    future: Future = field(default_factory=Future)


@dataclass
class BatchStats:
    requests: int = 0
    items: int = 0
    passes: int = 0


class DynamicBatcher(Generic[T, R]):
    """Runs ``forward(items) -> results`` (one result per item, in order) for many
    requests at once. ``max_wait_s`` 0 and ``max_items`` 1 give one pass per request."""

    def __init__(
        self,
        forward: Callable[[list[T]], Sequence[R]],
        max_items: int = 64,
        max_wait_s: float = 0.005,
        name: str = "batcher",
    ) -> None:
        self.forward = forward
        self.max_items = max(1, max_items)
        self.max_wait_s = max(0.0, max_wait_s)
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job[T] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[T]) -> Future:
        """A future of the results for ``items`` (a list, in order)."""
        job: _Job[T] = _Job(list(items))
        if not job.items:
            job.future.set_result([])
            return job.future
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            count = len(first.items)
            deadline = time.monotonic() + self.max_wait_s
            stop = False
            while count < self.max_items:
                remaining = deadline - time.monotonic()
                try:
                    job = (
                        self._queue.get(timeout=remaining)
                        if remaining > 0
                        else self._queue.get_nowait()
                    )
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
                count += len(job.items)
            self._pass(jobs)
            if stop:
                return

    def _pass(self, jobs: list[_Job[T]]) -> None:
        items = [item for job in jobs for item in job.items]
        self.stats.requests += len(jobs)
        self.stats.items += len(items)
        self.stats.passes += 1
        try:
            results = list(self.forward(items))
        except BaseException as e:  # noqa: BLE001 - every waiting request gets the error
            for job in jobs:
                job.future.set_exception(e)
            return
        at = 0
        for job in jobs:
            job.future.set_result(results[at : at + len(job.items)])
            at += len(job.items)
