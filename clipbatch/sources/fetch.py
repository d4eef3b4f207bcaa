"""Fetch referenced images concurrently: http(s) URLs and fsspec objects (s3://, paths).

Used by the table and folder readers. A fetch never raises for a bad reference: it
returns a row status. URLs reach public addresses only, unless ``allow_networks`` names
more (:mod:`clipbatch.sources.netguard`); a refused one is ``blocked_url``. Transient failures (timeouts, connection resets, HTTP 408/429/5xx,
throttling) are retried a bounded number of times with jittered backoff; a missing
object or an HTTP 404/410 is ``not_found`` at once; a transient failure that outlasted its
retries is ``fetch_transient`` (a later run can try again: ``--retry-failed``); everything
else is ``fetch_error``, which no run fetches again.
"""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from clipbatch.config import SourceConfig
from clipbatch.errors import ConfigError, is_transient
from clipbatch.io.retry import RetryPolicy, retrying
from clipbatch.io.storage import get_fs, is_http_url
from clipbatch.records import BLOCKED_URL, FETCH_ERROR, FETCH_TRANSIENT, NOT_FOUND, TOO_LARGE
from clipbatch.sources.netguard import AddressPolicy, BlockedAddressError, guarded_opener
from clipbatch.window import ordered

log = logging.getLogger(__name__)
T = TypeVar("T")

_USER_AGENT = "clipbatch/0.1 (+https://github.com/clipbatch)"
_BACKOFF_BASE_S = 0.2


@dataclass
class Fetched:
    """The bytes of one reference, or the status and reason it has none."""

    data: bytes | None = None
    status: str | None = None
    error: str | None = None


class _NotFound(Exception):
    pass


class _TooBig(Exception):
    pass


class Fetcher:
    """Fetches references with bounded concurrency, timeouts and retries."""

    def __init__(self, source: SourceConfig) -> None:
        self.source = source
        self.timeout = source.fetch_timeout_s
        self.retries = source.fetch_retries
        self.max_bytes = source.fetch_max_bytes
        self.concurrency = source.fetch_concurrency
        self.policy = RetryPolicy(attempts=source.fetch_retries + 1, base_delay=_BACKOFF_BASE_S)
        # Every connection, redirects included, to public addresses or allow_networks only.
        self.opener = guarded_opener(AddressPolicy.of(source.allow_networks))

    def fetch_many(self, refs: Iterable[str | None]) -> Iterator[Fetched | None]:
        """Results in the order of ``refs``; ``None`` in, ``None`` out."""
        for _, got in self.fetch_ordered((ref, ref) for ref in refs):
            yield got

    def fetch_ordered(
        self, items: Iterable[tuple[T, str | None]]
    ) -> Iterator[tuple[T, Fetched | None]]:
        """(item, result) in input order, fetching up to 4x ``fetch_concurrency`` rows ahead.

        A sliding window rather than batches: one slow URL holds back only the rows
        behind it in the output, while fetches further ahead keep running.
        """
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="fetch")

        def start(item: tuple[T, str | None]) -> Future[Fetched] | None:
            ref = item[1]
            return pool.submit(self.fetch, ref) if ref is not None else None

        try:
            for (item, _), future in ordered(items, start, ahead=4 * self.concurrency):
                yield item, future.result() if future is not None else None
        finally:
            # A consumer that stops early must not wait for fetches it will never read.
            pool.shutdown(wait=False, cancel_futures=True)

    def fetch(self, ref: str) -> Fetched:
        """One reference, with ``fetch_retries`` retries of transient failures."""
        attempts = 0

        def get() -> bytes:
            nonlocal attempts
            attempts += 1
            return self._get(ref)

        try:
            # Retries are quiet: a failing URL ends as a row status, counted and rate-limited.
            return Fetched(data=retrying(self.policy, f"fetch {ref}", logging.DEBUG)(get))
        except _NotFound as e:
            return Fetched(status=NOT_FOUND, error=f"{ref}: {e}")
        except _TooBig as e:
            return Fetched(status=TOO_LARGE, error=f"{ref}: {e}")
        except BlockedAddressError as e:
            return Fetched(status=BLOCKED_URL, error=f"{ref}: {e}")
        except ConfigError as e:
            return Fetched(status=FETCH_ERROR, error=f"{ref}: {e}")
        except Exception as e:  # noqa: BLE001 - every failure becomes a row status
            tries = f" after {attempts} attempts" if attempts > 1 else ""
            status = FETCH_TRANSIENT if is_transient(e) else FETCH_ERROR
            return Fetched(status=status, error=f"{ref}: {_describe(e)}{tries}")

    def _get(self, ref: str) -> bytes:
        if is_http_url(ref):
            return self._get_url(ref)
        fs, path = get_fs(ref, self.source.storage)
        try:
            size = fs.size(path)
        except FileNotFoundError as e:
            raise _NotFound("no such object") from e
        if size is not None and size > self.max_bytes:
            raise _TooBig(f"{size:,} bytes exceeds fetch_max_bytes {self.max_bytes:,}")
        try:
            return fs.cat_file(path)
        except FileNotFoundError as e:
            raise _NotFound("no such object") from e

    def _get_url(self, url: str) -> bytes:
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                data = response.read(self.max_bytes + 1)
        except urllib.error.HTTPError as e:
            if e.code in (404, 410):
                raise _NotFound(f"HTTP {e.code} {e.reason}") from e
            raise
        except urllib.error.URLError as e:
            if isinstance(e.reason, BlockedAddressError):
                raise e.reason from None
            raise
        if len(data) > self.max_bytes:
            raise _TooBig(f"more than fetch_max_bytes {self.max_bytes:,} bytes")
        return data


def _describe(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        reason = e.reason
        if isinstance(reason, socket.timeout | TimeoutError):
            return "timed out"
        return f"{type(reason).__name__}: {reason}"
    if isinstance(e, socket.timeout | TimeoutError):
        return "timed out"
    return f"{type(e).__name__}: {e}"
