"""What a plan reads: the records that describe the files listed now (one listing, a few reads)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa

from clipbatch.config import SinkConfig
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs
from clipbatch.sink.commits.legacy import legacy_records, read_legacy_manifest
from clipbatch.sink.commits.segments import (
    SEGMENT_SCHEMA,
    CommitRecord,
    Segment,
    file_version,
    list_segments,
    read_segment,
    record_at,
    records_table,
)

log = logging.getLogger(__name__)


@dataclass
class IndexView:
    """The records that describe the files listed now: one per shard, looked up by name.

    Held compactly (an Arrow table and a name -> row map, ~300 bytes a shard), so planning
    230,000 shards keeps a few tens of MB, not a Python object per field.
    """

    table: pa.Table
    rows: dict[str, int]
    segments: list[Segment] = field(default_factory=list)
    legacy_present: bool = False
    requests: int = 0  # object-store reads made to build it (segments, legacy manifest)

    def get(self, shard: str) -> CommitRecord | None:
        row = self.rows.get(shard)
        return None if row is None else record_at(self.table, row)

    def fingerprint(self, shard: str) -> str | None:
        """The fingerprint of the file listed now, as recorded; None when unrecorded."""
        row = self.rows.get(shard)
        return None if row is None else self.table.column("fingerprint")[row].as_py()

    def __contains__(self, shard: str) -> bool:
        return shard in self.rows

    def __len__(self) -> int:
        return len(self.rows)

    def records(self) -> Iterator[CommitRecord]:
        for row in sorted(self.rows.values()):
            yield record_at(self.table, row)


def load_index(sink: SinkConfig, listed: dict[str, str]) -> IndexView:
    """The records that match ``listed`` (shard name -> file version, from one listing).

    A record counts only while its file still has the version it recorded. Legacy
    ``_manifest.json`` entries carry no version: they are used, as before the index, for
    shards that have no segment record at all.
    """
    segments = list_segments(sink)
    view_tables: list[pa.Table] = []
    rows: dict[str, int] = {}
    seen: set[str] = set()
    offset = 0
    requests = 1
    for segment in segments:
        table = read_segment(sink, segment)
        requests += 1
        if table is None:
            continue
        shards = table.column("shard").to_pylist()
        versions = table.column("file_version").to_pylist()
        keep = []
        for i, (shard, version) in enumerate(zip(shards, versions, strict=True)):
            seen.add(shard)
            if version is not None and listed.get(shard) == version:
                keep.append(i)
        if keep:
            kept = table.take(keep)
            for j, shard in enumerate(kept.column("shard").to_pylist()):
                # Two records for one listed file version describe the same bytes: any wins.
                rows[shard] = offset + j
            view_tables.append(kept)
            offset += kept.num_rows
    legacy = read_legacy_manifest(sink)
    requests += 1
    if legacy:
        extra = [r for r in legacy_records(legacy) if r.shard not in seen and r.shard in listed]
        if extra:
            view_tables.append(records_table(extra))
            for j, r in enumerate(extra):
                rows[r.shard] = offset + j
            offset += len(extra)
    table = pa.concat_tables(view_tables) if view_tables else SEGMENT_SCHEMA.empty_table()
    return IndexView(
        table=table,
        rows=rows,
        segments=segments,
        legacy_present=legacy is not None,
        requests=requests,
    )


def all_records(sink: SinkConfig) -> list[CommitRecord]:
    """Every record of every segment, then legacy manifest entries (``clipbatch inspect``)."""
    out: list[CommitRecord] = []
    for segment in list_segments(sink):
        table = read_segment(sink, segment)
        if table is not None:
            out += [record_at(table, i) for i in range(table.num_rows)]
    seen = {r.shard for r in out}
    out += [r for r in legacy_records(read_legacy_manifest(sink) or {}) if r.shard not in seen]
    return out


def listed_versions(sink: SinkConfig) -> dict[str, str]:
    """Shard name -> file version of every committed shard file under ``dest`` (one listing)."""
    fs, path = get_fs(sink.url, sink.storage)
    try:
        entries = with_retries(lambda: fs.ls(path, detail=True), f"list {path}")
    except FileNotFoundError:
        return {}
    out = {}
    for e in entries:
        base = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if (
            e.get("type", "file") == "file"
            and base.endswith(".parquet")
            and not base.startswith(("_", "."))
        ):
            out[base[: -len(".parquet")]] = file_version(e, fs, e["name"])
    return out
