"""``{dest}/_commits/``: the commit index, whose cost per commit does not grow with the table.

Shard files are the truth; the index lets a run plan 230,000 shards with one listing of
``dest`` and a handful of reads, instead of a footer read per shard (design.md §2).

**Records.** One record per committed shard file: shard name, fingerprint, rows, counts,
sha256, source URI and version, run id, and the file's own version as the store lists
it (``file_version``: the ETag on object stores, size+mtime on local disk). A record
describes exactly one file: it is trusted only while the listed file still has that
version. So a file rewritten by a crashed or concurrent run can never be mistaken for
the one a stale record describes, whatever the interleaving.

**Segments.** Records live in immutable Parquet segments under ``_commits/``; nothing is
ever read-modified-written, so concurrent writers never race:

- a run collects its commits in memory and writes ``part-{run}-{seq}.parquet`` every
  ``FLUSH_RECORDS`` commits or ``FLUSH_SECONDS`` (a crash loses at most that window,
  which the next plan adopts from the files' own footers);
- at the end of the run its parts are merged into one ``run-{run}.parquet``;
- when more than ``MAX_SEGMENTS`` segments exist (or a legacy ``_manifest.json`` is still
  there), the run compacts them into one ``snapshot-….parquet``, keeping the records that
  still match the listed files, and deletes what it merged. Two runs compacting at once
  only produce two snapshots holding the same records; duplicates are harmless.

Every segment is written whole in one PUT (or an atomic rename locally), so a reader
never sees half a segment. Names start with ``_``, which table readers skip.

**Upgrade.** Tables written before the index have ``_manifest.json``. It is read (once
per plan) for shards that have no record in a segment, and folded into the first
snapshot, after which it is deleted.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import SinkConfig
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import (
    get_fs,
    is_local_fs,
    join,
    object_version,
    read_bytes,
    remove_quietly,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)

COMMITS_DIR = "_commits"
LEGACY_MANIFEST = "_manifest.json"
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


def commits_uri(dest: str) -> str:
    return join(dest, COMMITS_DIR)


def legacy_manifest_uri(dest: str) -> str:
    return join(dest, LEGACY_MANIFEST)


def utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def file_version(info: dict[str, Any], fs: Any = None, path: str = "") -> str:
    """The version of a committed shard file, as both a listing and a HEAD report it.

    ETags first (a HEAD also returns VersionId on versioned buckets, a listing does not),
    then size+mtime: :func:`clipbatch.io.storage.object_version` without version ids.
    """
    plain = {k: v for k, v in info.items() if k not in ("VersionId", "version_id", "generation")}
    return object_version(fs, path, plain)


# -- reading ------------------------------------------------------------------------------


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


@dataclass
class Segment:
    path: str  # on the sink's filesystem
    name: str
    records: int = 0


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


def read_legacy_manifest(sink: SinkConfig) -> dict[str, dict[str, Any]] | None:
    """The shard entries of a pre-index ``_manifest.json``, or None when there is none."""
    fs, path = get_fs(legacy_manifest_uri(sink.url), sink.storage)
    try:
        raw = read_bytes(fs, path)
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
    except ValueError as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return {}
    shards = data.get("shards") if isinstance(data, dict) else None
    return shards if isinstance(shards, dict) else {}


def _legacy_records(entries: dict[str, dict[str, Any]]) -> Iterator[CommitRecord]:
    for shard, e in entries.items():
        if not isinstance(e, dict) or not e.get("fingerprint"):
            continue
        yield CommitRecord(
            shard=shard,
            file=e.get("file") or f"{shard}.parquet",
            file_version=None,
            fingerprint=str(e["fingerprint"]),
            rows=int(e.get("rows") or 0),
            counts=dict(e.get("counts") or {}),
            sha256=e.get("sha256"),
            source_uri=e.get("source_uri"),
            source_version=e.get("source_version"),
            run_id=e.get("run_id"),
        )


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
        extra = [r for r in _legacy_records(legacy) if r.shard not in seen and r.shard in listed]
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
    out += [r for r in _legacy_records(read_legacy_manifest(sink) or {}) if r.shard not in seen]
    return out


# -- writing ------------------------------------------------------------------------------


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
        segments = list_segments(self.sink)
        legacy = _exists(self.sink, legacy_manifest_uri(self.sink.url))
        if len(segments) <= MAX_SEGMENTS and not legacy:
            return False
        self._count(compact(self.sink, segments))
        return True

    def _count(self, nbytes: int) -> None:
        self.bytes_written += nbytes
        self.segments_written += 1 if nbytes else 0

    def _remove(self, names: list[str]) -> None:
        fs, root = get_fs(commits_uri(self.sink.url), self.sink.storage)
        for name in names:
            remove_quietly(fs, f"{root.rstrip('/')}/{name}")


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
        for rec in _legacy_records(legacy or {})
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
                os.remove(f"{lpath}.lock")
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


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in text)[:64] or "run"
