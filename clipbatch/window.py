"""Bounded concurrency, in one place: read-ahead, ordered windows, and completion windows.

Every stage overlap and every fan-out in clipbatch is one of three shapes:

- :func:`prefetch`: run an iterator in a thread, at most ``depth`` items ahead of its
  consumer (the reader of a shard);
- :func:`ordered`: keep up to ``ahead`` items started (a decode batch, a URL fetch, a
  Parquet write) and hand them back in input order;
- :func:`completed`: keep up to ``size`` items started (shard task runs, backfill child
  runs) and hand each back as it finishes.

Memory is bounded by the window, never by the number of items. A consumer that stops
early (an error, a cancel) stops the producer: :func:`prefetch`'s thread exits, and
futures not yet handed back are cancelled.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
H = TypeVar("H", bound=Hashable)

_END = object()
STOP_WAIT_S = 5.0


class _Raised:
    def __init__(self, error: BaseException) -> None:
        self.error = error


@contextlib.contextmanager
def prefetch(items: Iterable[T], depth: int, name: str = "prefetch") -> Iterator[Iterator[T]]:
    """``items`` produced by a thread of its own, up to ``depth`` ahead of the consumer.

    Exceptions in the producer are raised in the consumer, in order. Leaving the block
    stops the producer, even one blocked on a full queue: the queue is drained so its
    ``put`` returns and it sees the stop.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                q.put(item)
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(_Raised(e))
            return
        q.put(_END)

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()

    def consume() -> Iterator[T]:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item

    try:
        yield consume()
    finally:
        stop.set()
        # Unblock a put so the producer sees the stop. One stuck in its own next() (a slow
        # read) is a daemon thread: left to finish after STOP_WAIT_S rather than waited for.
        deadline = time.monotonic() + STOP_WAIT_S
        while thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                q.get(timeout=0.05)


def ordered(
    items: Iterable[T], start: Callable[[T], Future[R] | None], ahead: int
) -> Iterator[tuple[T, Future[R] | None]]:
    """(item, its future) in input order, with up to ``ahead`` items started.

    ``start`` may return None (nothing to wait for). An item is handed back as soon as
    it is the oldest and done, or when the window is full; one slow item holds back only
    the items behind it in the output, while those ahead keep running.
    """
    pending: deque[tuple[T, Future[R] | None]] = deque()
    try:
        for item in items:
            pending.append((item, start(item)))
            while pending and (
                len(pending) >= ahead or pending[0][1] is None or pending[0][1].done()
            ):
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        for _, future in pending:  # a consumer that stops early waits for none of them
            if future is not None:
                future.cancel()


def completed(
    items: Iterable[T],
    start: Callable[[T], H],
    size: int,
    first_done: Callable[[list[H]], H],
) -> Iterator[tuple[T, H]]:
    """(item, its handle) as each finishes, with up to ``size`` started at once.

    ``start`` begins an item and returns a handle (a future, a flow run id); given the
    handles in flight, ``first_done`` waits until one has finished and returns it.
    """
    pending: dict[H, T] = {}
    for item in items:
        while len(pending) >= size:
            done = first_done(list(pending))
            yield pending.pop(done), done
        pending[start(item)] = item
    while pending:
        done = first_done(list(pending))
        yield pending.pop(done), done
