"""The run summary the flow returns and the CLI prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clipbatch.records import ShardResult, StageTimings


@dataclass
class RunSummary:
    dest: str
    run_id: str
    results: list[ShardResult] = field(default_factory=list)
    seconds: float = 0.0  # wall clock of the encode phase

    @property
    def committed(self) -> list[ShardResult]:
        return [r for r in self.results if r.status == "committed"]

    @property
    def skipped(self) -> list[ShardResult]:
        return [r for r in self.results if r.status == "skipped"]

    @property
    def failed(self) -> list[ShardResult]:
        return [r for r in self.results if r.status == "failed"]

    def rows_written(self) -> int:
        return sum(r.rows for r in self.committed)

    def ok_rows(self) -> int:
        return sum(r.ok_rows for r in self.committed)

    def images_per_second(self) -> float:
        return self.rows_written() / self.seconds if self.seconds > 0 else 0.0

    def timings(self) -> StageTimings:
        total = StageTimings()
        for r in self.committed:
            total.add(r.timings)
        return total

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.results:
            if r.status == "failed":
                continue
            for k, v in r.counts.items():
                counts[k] = counts.get(k, 0) + v
        return counts

    def to_dict(self) -> dict[str, Any]:
        return {
            "dest": self.dest,
            "run_id": self.run_id,
            "shards": len(self.results),
            "shards_committed": len(self.committed),
            "shards_skipped": len(self.skipped),
            "shards_failed": len(self.failed),
            "rows_written": self.rows_written(),
            "rows_ok": self.ok_rows(),
            "rows_failed": self.rows_written() - self.ok_rows(),
            "status_counts": self.status_counts(),
            "images_per_second": round(self.images_per_second(), 2),
            "seconds": round(self.seconds, 3),
            "timings": self.timings().as_dict(),
            "results": [r.to_dict() for r in self.results],
        }


class RunFailedError(Exception):
    """Some shards failed; the summary says which, and the others were committed."""

    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary
        failed = summary.failed
        detail = "; ".join(f"{r.shard}: {r.error}" for r in failed[:5])
        more = f" (+{len(failed) - 5} more)" if len(failed) > 5 else ""
        super().__init__(
            f"{len(failed)} of {len(summary.results)} shard(s) failed: {detail}{more}. "
            "Committed shards are kept; rerun to finish the rest."
        )
