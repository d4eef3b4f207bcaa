"""Exception types, and the one place that decides what is transient.

Deterministic errors (bad config, bad data) are never retried; transient ones
(network, throttling, a lost worker) are retried with backoff, in I/O calls and as
task retries. Everything that decides "retry or not" calls :func:`is_transient`.
"""

from __future__ import annotations

import errno
import socket


class ClipbatchError(Exception):
    """Base class for clipbatch errors."""


class ConfigError(ClipbatchError):
    """The configuration cannot work: fix it and rerun. Never retried."""


class SourceError(ClipbatchError):
    """A source cannot be listed or read in a way that no retry will fix."""


class TransientIOError(ClipbatchError):
    """A storage call failed in a way that may succeed when tried again."""


class ShardVerificationError(ClipbatchError):
    """A staged shard file does not match what was written (rows, schema)."""


class DiskFullError(ClipbatchError):
    """The local disk a shard is written to first is full. Not retried: the same disk
    stays full; free space (or point TMPDIR at a larger disk) and rerun."""


class TooManyErrorsError(ClipbatchError):
    """A shard's failed-row ratio exceeded ``max_error_ratio``; its rows were still written."""

    def __init__(self, shard: str, failed: int, total: int, max_ratio: float) -> None:
        self.shard, self.failed, self.total, self.max_ratio = shard, failed, total, max_ratio
        super().__init__(
            f"shard {shard}: {failed} of {total} rows failed "
            f"({failed / max(total, 1):.1%} > max_error_ratio {max_ratio:.1%}); "
            "the rows were written with their statuses, see the 'status' and 'error' columns"
        )


class ShardTaskError(ClipbatchError):
    """A task run over a group of shards stopped or failed; carries the shards' results.

    ``transient``: it stopped at a transient error (retried; the retry skips the shards
    already committed). Otherwise some shards failed for good and the rest are done.
    Survives pickling (Dask, Ray), results and flag included.
    """

    def __init__(self, message: str, results: list, transient: bool) -> None:
        super().__init__(message)
        self.results = list(results)
        self.transient = transient

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.results, self.transient))


class RunStopped(BaseException):
    """The run was stopped from outside (SIGTERM, SIGINT, a cancellation): committed shards
    are kept, and a rerun goes on from them. A BaseException, like KeyboardInterrupt, so
    no ``except Exception`` swallows it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class ChecksumMismatchError(ConfigError):
    """A checkpoint's sha256 differs from the one the user asked for."""


_TRANSIENT_ERRNOS = {
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.ETIMEDOUT,
    errno.EHOSTUNREACH,
    errno.ENETUNREACH,
    errno.EAGAIN,
}

_TRANSIENT_MARKERS = (
    "slowdown",
    "slow down",
    "throttl",
    "serviceunavailable",
    "service unavailable",
    "internalerror",
    "internal error",
    "requesttimeout",
    "request timeout",
    "connection reset",
    "connection aborted",
    "connection refused",
    "could not connect",  # botocore EndpointConnectionError: the store is down
    "connection was closed",  # botocore ConnectionClosedError
    "read timeout",
    "server disconnected",
    "timed out",
    "timeout",
    "temporarily unavailable",
    "broken pipe",
    "payload is not completed",
    "response payload",
    "incomplete read",
    "content-length",
    "worker lost",
    "crashed",
)


def _http_status(exc: BaseException) -> int | None:
    """Best-effort HTTP status from botocore/aiohttp/fsspec exceptions."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(status, int):
            return status
    for attr in ("status", "status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int) and 100 <= value < 600:
            return value
    return None


def is_transient(exc: BaseException | None) -> bool:
    """True when ``exc`` (or anything in its cause chain) may succeed on retry."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, TransientIOError):
            return True
        if isinstance(exc, ShardTaskError):
            return exc.transient
        if isinstance(
            exc, ConfigError | TooManyErrorsError | ShardVerificationError | DiskFullError
        ):
            return False
        if isinstance(exc, socket.timeout | TimeoutError | ConnectionError):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
            return True
        status = _http_status(exc)
        if status is not None:
            if status in (408, 429) or status >= 500:
                return True
            if 400 <= status < 500:
                return False
        name = type(exc).__name__.lower()
        text = f"{name} {exc}".lower()
        if any(marker in text for marker in _TRANSIENT_MARKERS) and not isinstance(
            exc, FileNotFoundError | PermissionError
        ):
            return True
        exc = exc.__cause__ or exc.__context__
    return False
