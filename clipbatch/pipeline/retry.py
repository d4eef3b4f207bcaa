"""Retry what was transient: fetch again the failed rows of a committed shard.

A URL that timed out, was reset or answered 5xx after its retries leaves a
``fetch_transient`` row; the shard is committed and, its fingerprint unchanged, every
later run skips it. ``retry_failed`` (``clipbatch run --retry-failed``) takes such shards
up again:

- only the rows whose fetch failed transiently (``fetch_transient``; in files written
  before that status, ``fetch_error``) and that have had fewer than
  ``max_fetch_attempts`` runs try are fetched and encoded again; a permanent failure
  (``fetch_error``, ``not_found``, ``blocked_url``) is never fetched again;
- every other row is carried over from the committed file as it is, vectors included:
  nothing is re-encoded;
- the file is rewritten through the commit protocol (stage, verify, move): a new file
  version, so the commit index and the kNN index see it changed; the fingerprint stays;
- rows that succeed get their vectors; rows that fail again keep their status with one
  more attempt counted in the file's metadata (``fetch_attempts``: no column, no
  fingerprint change); the metadata names the run that retried and what it recovered.

Only table and folder sources fetch images, so only their shards can have such rows.
"""

from __future__ import annotations

import logging
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs
from clipbatch.pipeline.shard import ShardContext, encoded_blocks, shard_writer, timed
from clipbatch.records import (
    FETCH_ERROR,
    FETCH_TRANSIENT,
    RETRYABLE_STATUSES,
    ShardResult,
    ShardSpec,
    StageTimings,
)
from clipbatch.sink.layout import output_uri
from clipbatch.sink.members import read_members
from clipbatch.sink.rows import block_table
from clipbatch.sink.writer import read_file_metadata
from clipbatch.skiplog import SkipLogger

log = logging.getLogger(__name__)


def retryable_statuses(metadata: dict) -> frozenset[str]:
    """The statuses a file's rows may be retried from: files written before
    ``fetch_transient`` existed (no ``fetch_attempts`` in their metadata) said
    ``fetch_error`` for every fetch failure, transient or not."""
    if "fetch_attempts" in metadata:
        return RETRYABLE_STATUSES
    return RETRYABLE_STATUSES | {FETCH_ERROR}


def retry_shard(
    shard: ShardSpec, ctx: ShardContext, fingerprint: str, max_attempts: int
) -> ShardResult:
    """Fetch and encode again the retryable rows of ``shard``'s committed file, carry the
    rest over, and commit the file anew. Nothing to retry: a ``skipped`` result."""
    start, timings = time.perf_counter(), StageTimings()
    sink = ctx.config.sink
    uri = output_uri(sink.url, shard.name)
    meta = read_file_metadata(uri, sink.storage) or {}
    if not meta.get("fingerprint"):  # gone or unreadable since the plan: leave it
        return _skipped(shard, uri, meta, fingerprint, "the committed file is unreadable")
    attempts = {k: int(v) for k, v in (meta.get("fetch_attempts") or {}).items()}
    fs, path = get_fs(uri, sink.storage)
    committed = with_retries(lambda: pq.read_table(path, filesystem=fs), f"read {uri}")
    statuses = committed.column("status").to_pylist()
    keys = committed.column("key").to_pylist()
    retryable = retryable_statuses(meta)
    todo = {
        k for k, s in zip(keys, statuses, strict=True)
        if s in retryable and attempts.get(k, 1) < max_attempts
    }  # fmt: skip
    if not todo:
        return _skipped(shard, uri, meta, fingerprint, "no row left to retry")
    log.info("shard %s: fetching %d failed row(s) again", shard.name, len(todo))

    writer = shard_writer(shard, ctx, fingerprint)
    skips = SkipLogger(log, shard.name)
    fresh: list[pa.Table] = []
    fetched_members = []
    try:
        with encoded_blocks(
            ctx.reader.read(shard, todo), ctx, shard.name, timings, skips
        ) as blocks:
            for block in blocks:
                fresh.append(
                    block_table(block, writer.schema, writer.passthrough, shard.uri, shard.version)
                )
                fetched_members.append(block.rows)
        new = pa.concat_tables(fresh) if fresh else writer.schema.empty_table()
        merged, recovered = _merge(committed.cast(writer.schema), new)
        new_status = dict(
            zip(new.column("key").to_pylist(), new.column("status").to_pylist(), strict=True)
        )
        for key in todo:
            status = new_status.get(key)
            if status in (FETCH_TRANSIENT, FETCH_ERROR):
                attempts[key] = attempts.get(key, 1) + 1
            else:
                attempts.pop(key, None)
        # Rows not retried keep what they had; a legacy fetch_error row now permanent
        # (fetch_error under the new rule) keeps its count too.
        for key, status in zip(keys, statuses, strict=True):
            if key not in todo and status in (FETCH_TRANSIENT, FETCH_ERROR):
                attempts.setdefault(key, 1)
        writer.fetch_attempts = attempts
        writer.metadata["retried"] = {
            "run_id": ctx.run_id,
            "rows": len(todo),
            "recovered": recovered,
            "previous_run": (meta.get("run") or {}).get("run_id"),
        }
        with timed(timings, "write"):
            writer.write_table(merged)
            old_members = read_members(sink.url, shard.name, sink.storage)
            if old_members is not None:
                writer.members.add_table(
                    old_members.filter(
                        pc.invert(pc.is_in(old_members.column("key"), pa.array(sorted(todo))))
                    )
                )
            for rows in fetched_members:
                writer.members.add(rows)
            final_uri, sha, version = writer.close_and_commit()
    except BaseException:
        writer.abort()
        raise
    skips.summary()
    log.info("shard %s: %d of %d retried row(s) recovered", shard.name, recovered, len(todo))
    return ShardResult(
        shard=shard.name,
        output_uri=final_uri,
        status="committed",
        rows=writer.rows,
        counts=dict(writer.counts),
        seconds=time.perf_counter() - start,
        timings=timings,
        fingerprint=fingerprint,
        source_uri=shard.uri,
        source_version=shard.version,
        sha256=sha,
        file_version=version,
        retried={"rows": len(todo), "recovered": recovered},
    )


def _merge(committed: pa.Table, new: pa.Table) -> tuple[pa.Table, int]:
    """``committed`` with the rows ``new`` has replaced by key, in the committed order;
    and how many of them are ok now."""
    position = {k: i for i, k in enumerate(new.column("key").to_pylist())}
    both = pa.concat_tables([committed, new])
    take = [
        committed.num_rows + position[k] if k in position else i
        for i, k in enumerate(committed.column("key").to_pylist())
    ]
    recovered = sum(1 for s in new.column("status").to_pylist() if s == "ok")
    return both.take(pa.array(take, type=pa.int64())), recovered


def _skipped(shard: ShardSpec, uri: str, meta: dict, fingerprint: str, why: str) -> ShardResult:
    log.info("shard %s: not retried: %s", shard.name, why)
    return ShardResult(
        shard=shard.name,
        output_uri=uri,
        status="skipped",
        rows=int(meta.get("rows") or 0),
        counts=dict(meta.get("counts") or {}),
        fingerprint=fingerprint,
        source_uri=shard.uri,
        source_version=shard.version,
    )
