"""The run summary the flow returns and the CLI prints.

It aggregates as results arrive and keeps only the first ``MAX_RESULTS`` results (and the
first ``MAX_RESULTS`` failures), so a run over 230,000 shards holds counters, not a
result per shard; every shard's outcome is in the run record's output parts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from clipbatch.records import ShardResult, StageTimings

MAX_RESULTS = 1000  # results kept for the returned summary and the UI's table


@dataclass
class RunSummary:
    dest: str
    run_id: str
    seconds: float = 0.0  # wall clock of the encode phase
    results: list[ShardResult] = field(default_factory=list)  # the first MAX_RESULTS
    failed: list[ShardResult] = field(default_factory=list)  # the first MAX_RESULTS failures
    shards: int = 0
    by_status: Counter = field(default_factory=Counter)  # committed | skipped | failed
    rows_written: int = 0
    rows_ok: int = 0
    status_counts: Counter = field(default_factory=Counter)  # rows, committed and skipped
    timings: StageTimings = field(default_factory=StageTimings)  # committed shards

    @classmethod
    def of(cls, dest: str, run_id: str, results: list[ShardResult]) -> RunSummary:
        summary = cls(dest=dest, run_id=run_id)
        for r in results:
            summary.add(r)
        return summary

    def add(self, result: ShardResult) -> None:
        self.shards += 1
        self.by_status[result.status] += 1
        if len(self.results) < MAX_RESULTS:
            self.results.append(result)
        if result.status == "failed":
            if len(self.failed) < MAX_RESULTS:
                self.failed.append(result)
            return
        self.status_counts.update(result.counts)
        if result.status == "committed":
            self.rows_written += result.rows
            self.rows_ok += result.ok_rows
            self.timings.add(result.timings)

    @property
    def committed(self) -> int:
        return self.by_status["committed"]

    @property
    def skipped(self) -> int:
        return self.by_status["skipped"]

    @property
    def failures(self) -> int:
        return self.by_status["failed"]

    def first_done(self) -> ShardResult | None:
        """A committed or skipped shard's result (its file carries the table's schema)."""
        return next((r for r in self.results if r.status != "failed" and r.output_uri), None)

    def images_per_second(self) -> float:
        return self.rows_written / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "dest": self.dest,
            "run_id": self.run_id,
            "shards": self.shards,
            "shards_committed": self.committed,
            "shards_skipped": self.skipped,
            "shards_failed": self.failures,
            "rows_written": self.rows_written,
            "rows_ok": self.rows_ok,
            "rows_failed": self.rows_written - self.rows_ok,
            "status_counts": dict(self.status_counts),
            "images_per_second": round(self.images_per_second(), 2),
            "seconds": round(self.seconds, 3),
            "timings": self.timings.as_dict(),
            "results": [r.to_dict() for r in self.results],
            "results_omitted": self.shards - len(self.results),
        }


class RunFailedError(Exception):
    """Some shards failed; the summary says which, and the others were committed."""

    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary
        failed = summary.failed
        detail = "; ".join(f"{r.shard}: {r.error}" for r in failed[:5])
        more = f" (+{summary.failures - 5} more)" if summary.failures > 5 else ""
        super().__init__(
            f"{summary.failures} of {summary.shards} shard(s) failed: {detail}{more}. "
            "Committed shards are kept; rerun to finish the rest."
        )
