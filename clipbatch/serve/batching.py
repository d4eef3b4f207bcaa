"""Dynamic batching: concurrent requests share one forward pass.

The services clipbatch descends from ran one forward pass per item. Here each request
puts its items in a queue; one thread takes the first waiting request, then gathers
more for at most ``max_wait_s``, until ``max_items``, or until none has come for
``quiet_s`` (a burst that has all arrived gains nothing from the rest of the wait), runs
the model once over all of them, and hands each request its slice. Requests that come
while a pass runs make up the next one. A lone request waits ``quiet_s`` at most; 32
clients at once share a few passes instead of making 32.

From a coroutine, :meth:`DynamicBatcher.submit_async`: a pass resolves all its requests
of one event loop in one call into that loop, not one thread-safe wake-up each.

Example::

    batcher = DynamicBatcher(lambda texts: model.encode_texts(texts)[0], max_items=64)
    vectors = batcher.submit(["a red circle"]).result()
    batcher.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

QUIET_S = 0.001  # a wait ends once no request has come for this long
T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Job(Generic[T]):
    items: list[T]
    future: Future | asyncio.Future = field(default_factory=Future)
    loop: asyncio.AbstractEventLoop | None = None  # an asyncio future's, else None


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
        quiet_s: float = QUIET_S,
    ) -> None:
        self.forward = forward
        self.max_items = max(1, max_items)
        self.max_wait_s = max(0.0, max_wait_s)
        self.quiet_s = max(0.0, quiet_s)
        self.stats = BatchStats()
        self._queue: queue.Queue[_Job[T] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[T]) -> Future:
        """A future of the results for ``items`` (a list, in order)."""
        return self._enqueue(_Job(list(items)))  # type: ignore[return-value]

    def submit_async(self, items: Sequence[T]) -> asyncio.Future:
        """``submit`` for a coroutine: an asyncio future of the running loop. A pass
        resolves all its requests of one loop in one call into that loop (not one
        thread-safe wake-up per request)."""
        loop = asyncio.get_running_loop()
        return self._enqueue(_Job(list(items), loop.create_future(), loop))  # type: ignore[return-value]

    def _enqueue(self, job: _Job[T]) -> Future | asyncio.Future:
        """The job queued for a pass (nothing to encode: answered at once); its future."""
        if not job.items:
            job.future.set_result([])
        else:
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
                # Until the deadline, or until requests stop coming: a burst that has all
                # arrived gains nothing from the rest of the wait.
                remaining = min(deadline - time.monotonic(), self.quiet_s)
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
        outcomes: list[tuple[bool, Any]] = []
        try:
            results = list(self.forward(items))
        except BaseException as e:  # noqa: BLE001 - every waiting request gets the error
            outcomes = [(False, e)] * len(jobs)
        else:
            at = 0
            for job in jobs:
                outcomes.append((True, results[at : at + len(job.items)]))
                at += len(job.items)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future, bool, Any]]] = {}
        for job, (ok, value) in zip(jobs, outcomes, strict=True):
            if job.loop is None:
                future: Future = job.future  # type: ignore[assignment]
                if ok:
                    future.set_result(value)
                else:
                    future.set_exception(value)
            else:
                by_loop.setdefault(job.loop, []).append((job.future, ok, value))  # type: ignore[arg-type]
        for loop, done in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                loop.call_soon_threadsafe(_resolve, done)


def _resolve(done: list[tuple[asyncio.Future, bool, Any]]) -> None:
    """In the loop: hand each waiting request its result (one that gave up: skipped)."""
    for future, ok, value in done:
        if future.done():
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
