"""Merging the index's segments (and a legacy manifest) into one snapshot, when it is due."""

from __future__ import annotations

import contextlib
import logging
import os
import uuid

import pyarrow as pa

from clipbatch.config import SinkConfig
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs, is_local_fs, remove_quietly
from clipbatch.sink.commits.index import listed_versions
from clipbatch.sink.commits.legacy import legacy_manifest_uri, legacy_records, read_legacy_manifest
from clipbatch.sink.commits.segments import (
    MAX_SEGMENTS,
    SEGMENT_SCHEMA,
    CommitRecord,
    Segment,
    list_segments,
    read_segment,
    records_table,
    utc_stamp,
    write_segment,
)
from clipbatch.upgrade.manifest_v1 import LOCK_SUFFIX

log = logging.getLogger(__name__)


def compact_if_due(sink: SinkConfig) -> int:
    """Compact when more than ``MAX_SEGMENTS`` segments (or a legacy manifest) exist;
    returns the bytes written (0 when it was not due)."""
    segments = list_segments(sink)
    legacy = _exists(sink, legacy_manifest_uri(sink.url))
    if len(segments) <= MAX_SEGMENTS and not legacy:
        return 0
    return compact(sink, segments)


def compact(sink: SinkConfig, segments: list[Segment] | None = None) -> int:
    """Merge every segment (and a legacy manifest) into one snapshot; returns bytes written.

    Order matters under concurrency: segments are listed and read *before* ``dest`` is
    listed, so a record in a merged segment describes a file version no older than the
    one listed; only the merged segments are deleted, never one written meanwhile.
    """
    segments = list_segments(sink) if segments is None else segments
    tables = [t for t in (read_segment(sink, s) for s in segments) if t is not None]
    legacy = read_legacy_manifest(sink)
    listed = listed_versions(sink)
    merged = pa.concat_tables(tables) if tables else SEGMENT_SCHEMA.empty_table()
    shards = merged.column("shard").to_pylist()
    keep: dict[str, int] = {}
    for i, (shard, version) in enumerate(
        zip(shards, merged.column("file_version").to_pylist(), strict=True)
    ):
        if version is not None and listed.get(shard) == version:
            keep[shard] = i
    parts = [merged.take(pa.array(sorted(keep.values()), type=pa.int64()))]
    seen = set(shards)
    del shards
    extra = [
        # Bound to the file it describes from now on: the version listed now.
        _with_version(rec, listed[rec.shard])
        for rec in legacy_records(legacy or {})
        if rec.shard not in seen and rec.shard in listed
    ]
    if extra:
        parts.append(records_table(extra))
    snapshot = pa.concat_tables(parts).sort_by("shard")
    nbytes = 0
    if snapshot.num_rows:
        name = f"snapshot-{utc_stamp()}-{uuid.uuid4().hex[:8]}.parquet"
        nbytes = write_segment(sink, name, snapshot)
    fs, _ = get_fs(sink.url, sink.storage)
    for s in segments:
        remove_quietly(fs, s.path)
    if legacy is not None:
        lfs, lpath = get_fs(legacy_manifest_uri(sink.url), sink.storage)
        remove_quietly(lfs, lpath)
        if is_local_fs(lfs):  # the old flock file, never removed by the old code
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{lpath}{LOCK_SUFFIX}")
    log.info(
        "compacted %d commit segment(s)%s into one of %d record(s)",
        len(segments),
        " and the legacy manifest" if legacy is not None else "",
        snapshot.num_rows,
    )
    return nbytes


def _with_version(rec: CommitRecord, version: str) -> CommitRecord:
    values = {name: getattr(rec, name) for name in CommitRecord.__slots__}
    values["file_version"] = version
    return CommitRecord(**values)


def _exists(sink: SinkConfig, uri: str) -> bool:
    fs, path = get_fs(uri, sink.storage)
    try:
        return bool(with_retries(lambda: fs.exists(path), f"stat {path}"))
    except FileNotFoundError:
        return False
