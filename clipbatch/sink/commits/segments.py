"""Commit records and the segment files that hold them: list, read and write one segment."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import SinkConfig
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs, join, object_version, read_bytes, write_bytes_atomic

log = logging.getLogger(__name__)

COMMITS_DIR = "_commits"
FLUSH_RECORDS = 1000
FLUSH_SECONDS = 60.0
MAX_SEGMENTS = 8

SEGMENT_SCHEMA = pa.schema(
    [
        pa.field("shard", pa.string(), nullable=False),
        pa.field("file", pa.string()),
        pa.field("file_version", pa.string()),
        pa.field("fingerprint", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("counts", pa.string()),  # JSON object: status -> rows
        pa.field("sha256", pa.string()),
        pa.field("source_uri", pa.string()),
        pa.field("source_version", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("committed_at", pa.string()),
    ]
)


@dataclass(frozen=True, slots=True)
class CommitRecord:
    """What the index knows of one committed shard file."""

    shard: str
    file: str
    file_version: str | None  # None only for records migrated from a legacy manifest
    fingerprint: str
    rows: int
    counts: dict[str, int]
    sha256: str | None
    source_uri: str | None
    source_version: str | None
    run_id: str | None
    committed_at: str | None = None


@dataclass
class Segment:
    path: str  # on the sink's filesystem
    name: str
    records: int = 0


def commits_uri(dest: str) -> str:
    return join(dest, COMMITS_DIR)


def utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def file_version(info: dict[str, Any], fs: Any = None, path: str = "") -> str:
    """The version of a committed shard file, as both a listing and a HEAD report it.

    ETags first (a HEAD also returns VersionId on versioned buckets, a listing does not),
    then size+mtime: :func:`clipbatch.io.storage.object_version` without version ids.
    """
    plain = {k: v for k, v in info.items() if k not in ("VersionId", "version_id", "generation")}
    return object_version(fs, path, plain)


def records_table(records: Iterable[CommitRecord]) -> pa.Table:
    cols: dict[str, list[Any]] = {f.name: [] for f in SEGMENT_SCHEMA}
    for r in records:
        cols["shard"].append(r.shard)
        cols["file"].append(r.file)
        cols["file_version"].append(r.file_version)
        cols["fingerprint"].append(r.fingerprint)
        cols["rows"].append(r.rows)
        cols["counts"].append(json.dumps(r.counts, sort_keys=True))
        cols["sha256"].append(r.sha256)
        cols["source_uri"].append(r.source_uri)
        cols["source_version"].append(r.source_version)
        cols["run_id"].append(r.run_id)
        cols["committed_at"].append(r.committed_at)
    return pa.table(cols, schema=SEGMENT_SCHEMA)


def record_at(table: pa.Table, row: int) -> CommitRecord:
    values = {name: table.column(name)[row].as_py() for name in SEGMENT_SCHEMA.names}
    values["counts"] = json.loads(values["counts"] or "{}")
    values["rows"] = int(values["rows"] or 0)
    return CommitRecord(**values)


def list_segments(sink: SinkConfig) -> list[Segment]:
    fs, root = get_fs(commits_uri(sink.url), sink.storage)
    try:
        entries = with_retries(lambda: fs.ls(root, detail=True), f"list {root}")
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e.get("type", "file") == "file" and name.endswith(".parquet") and name[0] != ".":
            out.append(Segment(path=e["name"], name=name))
    return sorted(out, key=lambda s: s.name)


def read_segment(sink: SinkConfig, segment: Segment) -> pa.Table | None:
    """One GET for the whole segment; None when it vanished (merged by a concurrent run)."""
    fs, _ = get_fs(sink.url, sink.storage)
    try:
        data = read_bytes(fs, segment.path)
    except FileNotFoundError:
        return None
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (OSError, pa.ArrowInvalid) as e:
        # Segments are written whole, so this is damage from outside: the files it
        # described are adopted again from their footers.
        log.warning("ignoring unreadable commit segment %s: %s", segment.path, e)
        return None
    segment.records = table.num_rows
    return table.select(SEGMENT_SCHEMA.names).cast(SEGMENT_SCHEMA)


def _segment_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()


def write_segment(sink: SinkConfig, name: str, records: pa.Table) -> int:
    """Write one segment whole; returns its size in bytes."""
    fs, path = get_fs(join(commits_uri(sink.url), name), sink.storage)
    data = _segment_bytes(records)
    write_bytes_atomic(fs, path, data)
    return len(data)
