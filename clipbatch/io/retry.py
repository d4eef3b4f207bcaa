"""Retries: one policy per layer, each configured once (docs/design.md §5).

| layer | retries | policy |
|---|---|---|
| an HTTP request to S3 | none (botocore ``total_max_attempts=1``, s3fs ``retries=1``) | set explicitly in :func:`clipbatch.io.storage.fsspec_kwargs`, so attempts never multiply |
| a storage call (list, stat, put, copy, a read of a stream) | :data:`STORAGE`: 6 attempts | :func:`with_retries`, :class:`RetryingReader` |
| an image fetch (URL or object) | ``source.fetch_retries`` | :func:`retrying` in :mod:`clipbatch.sources.fetch` |
| a shard task | ``runtime.task_retries`` | Prefect, on the task (``flows/embed.py``) |

Every layer retries only what :func:`clipbatch.errors.is_transient` says may succeed,
with exponential backoff plus as much again at random (tenacity's ``wait_exponential``
+ ``wait_random_exponential``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import tenacity

from clipbatch.errors import TransientIOError, is_transient

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    base_delay: float = 0.2  # the first wait is up to this long, then doubling
    max_delay: float = 10.0


# Six attempts, waits of 0.2, 0.4, 0.8, 1.6 and 3.2 s, each plus as much again at random:
# a storage call outlasts a store's blip of 6.2 s at least (12.4 s at most). This layer
# is the only one (botocore makes one attempt), so its window is the call's whole window.
STORAGE = RetryPolicy(attempts=6)


def retrying(policy: RetryPolicy, what: str, level: int = logging.WARNING) -> tenacity.Retrying:
    """tenacity's loop for ``policy``: transient errors only, jittered exponential waits."""

    def log_retry(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.log(
            level,
            "%s failed (%s: %s); retry %d in %.2fs",
            what,
            type(error).__name__,
            error,
            state.attempt_number,
            state.next_action.sleep if state.next_action else 0.0,
        )

    return tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        # "Equal jitter": the exponential wait, plus up to as much again at random. Full
        # jitter alone can make every wait short, and a blip of a few seconds then outlasts
        # all the attempts; the fixed half guarantees the window, the random half spreads
        # the clients that failed together.
        wait=tenacity.wait_exponential(multiplier=policy.base_delay, max=policy.max_delay)
        + tenacity.wait_random_exponential(multiplier=policy.base_delay, max=policy.max_delay),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=log_retry,
        reraise=True,
    )


def with_retries(fn: Callable[[], T], what: str, policy: RetryPolicy = STORAGE) -> T:
    """Call ``fn``, retrying transient failures; after the last, a :class:`TransientIOError`."""
    try:
        return retrying(policy, what)(fn)
    except Exception as e:
        if is_transient(e) and not isinstance(e, TransientIOError):
            raise TransientIOError(
                f"{what}: still failing after {policy.attempts} attempts: {e}"
            ) from e
        raise


class RetryingReader:
    """A read-only file over ``open_`` that resumes where it was after a transient error.

    Streams (a tar read member by member, a Parquet file read by row group) are long-lived:
    a connection reset halfway through must not fail the shard. Each read or seek is one
    storage call under :data:`STORAGE`; a failed one reopens the object at the same offset.
    """

    def __init__(self, open_: Callable[[], IO[bytes]], what: str, policy: RetryPolicy = STORAGE):
        self._open = open_
        self._what = what
        self._policy = policy
        self._f: IO[bytes] | None = None
        self._pos = 0

    def _call(self, op: Callable[[IO[bytes]], Any]) -> Any:
        def attempt() -> Any:
            if self._f is None:
                self._f = self._open()
                if self._pos:
                    self._f.seek(self._pos)
            try:
                return op(self._f)
            except Exception:
                self._close_quietly()  # reopened, at the same offset, by the next attempt
                raise

        return with_retries(attempt, self._what, self._policy)

    def read(self, size: int = -1) -> bytes:
        data = self._call(lambda f: f.read(size))
        self._pos += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = self._call(lambda f: f.seek(offset, whence))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return False

    def _close_quietly(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            with contextlib.suppress(Exception):  # the connection may be gone already
                f.close()

    def close(self) -> None:
        self._close_quietly()

    def __enter__(self) -> RetryingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
