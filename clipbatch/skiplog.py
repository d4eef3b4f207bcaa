"""Counted, rate-limited logging of skipped samples: never one line per row in a flood."""

from __future__ import annotations

import logging
import time
from collections import Counter


class SkipLogger:
    """Counts non-ok rows by status; logs the first few, then at most once per interval."""

    def __init__(
        self, log: logging.Logger, shard: str, first: int = 5, interval_s: float = 10.0
    ) -> None:
        self.log, self.shard, self.first, self.interval_s = log, shard, first, interval_s
        self.counts: Counter[str] = Counter()
        self._logged = 0
        self._last = 0.0

    def record(self, key: str, status: str, error: str | None) -> None:
        self.counts[status] += 1
        now = time.monotonic()
        if self._logged < self.first:
            self._logged += 1
            self._last = now
            self.log.warning("shard %s: row %s is %s: %s", self.shard, key, status, error)
        elif now - self._last >= self.interval_s:
            self._last = now
            self.log.warning(
                "shard %s: %d rows not ok so far %s",
                self.shard,
                sum(self.counts.values()),
                dict(self.counts),
            )

    def summary(self) -> None:
        if self.counts:
            self.log.warning(
                "shard %s: %d rows not ok: %s",
                self.shard,
                sum(self.counts.values()),
                dict(self.counts),
            )
