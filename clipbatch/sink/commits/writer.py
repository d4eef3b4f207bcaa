"""A run's commits, buffered and written as segments; merged and compacted at its end."""

from __future__ import annotations

import time
import uuid

import pyarrow as pa

from clipbatch.config import SinkConfig
from clipbatch.io.storage import get_fs, remove_quietly
from clipbatch.sink.commits.compact import compact_if_due
from clipbatch.sink.commits.segments import (
    FLUSH_RECORDS,
    FLUSH_SECONDS,
    CommitRecord,
    Segment,
    commits_uri,
    read_segment,
    records_table,
    write_segment,
)


class IndexWriter:
    """A run's commits, buffered and written as segments (see the module docstring).

    Called from the flow as shard results arrive (one thread). ``bytes_written`` and
    ``segments_written`` feed the scale benchmark.
    """

    def __init__(
        self,
        sink: SinkConfig,
        run_id: str,
        flush_records: int = FLUSH_RECORDS,
        flush_seconds: float = FLUSH_SECONDS,
    ) -> None:
        self.sink = sink
        self.token = f"{_safe(run_id)}-{uuid.uuid4().hex[:8]}"
        self.flush_records = flush_records
        self.flush_seconds = flush_seconds
        self._pending: list[CommitRecord] = []
        self._first_pending = 0.0
        self._parts: list[str] = []
        self.records = 0
        self.bytes_written = 0
        self.segments_written = 0

    def add(self, record: CommitRecord) -> None:
        if not self._pending:
            self._first_pending = time.monotonic()
        self._pending.append(record)
        self.records += 1
        if (
            len(self._pending) >= self.flush_records
            or time.monotonic() - self._first_pending >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Write the pending records as this run's next part segment."""
        if not self._pending:
            return
        table = records_table(self._pending)
        name = f"part-{self.token}-{len(self._parts):05d}.parquet"
        self._count(write_segment(self.sink, name, table))
        self._parts.append(name)
        self._pending = []

    def close(self, compact: bool = True) -> None:
        """Flush; merge this run's parts into one segment; compact the index if it is due."""
        self.flush()
        if len(self._parts) > 1:
            # Read back rather than held: the flow keeps no record per shard for the run.
            root = commits_uri(self.sink.url)
            parts = [
                read_segment(
                    self.sink, Segment(path=get_fs(f"{root}/{n}", self.sink.storage)[1], name=n)
                )
                for n in self._parts
            ]
            merged = pa.concat_tables([t for t in parts if t is not None])
            self._count(write_segment(self.sink, f"run-{self.token}.parquet", merged))
            self._remove(self._parts)
        if compact:
            self.compact_if_due()

    def compact_if_due(self) -> bool:
        """Compact the index when it is due; whether it was."""
        nbytes = compact_if_due(self.sink)
        self._count(nbytes)
        return nbytes > 0

    def _count(self, nbytes: int) -> None:
        self.bytes_written += nbytes
        self.segments_written += 1 if nbytes else 0

    def _remove(self, names: list[str]) -> None:
        fs, root = get_fs(commits_uri(self.sink.url), self.sink.storage)
        for name in names:
            remove_quietly(fs, f"{root.rstrip('/')}/{name}")


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:64] or "run"
