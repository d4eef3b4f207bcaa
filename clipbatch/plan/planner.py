"""Which shards a run must encode, and which it can skip (docs/design.md §4).

Planning is done once, in the flow, with a bounded number of requests whatever the
dataset's size: one listing of the source (its kind detected from it), one listing of
``dest``, and the commit index's few segments (:mod:`clipbatch.sink.commits`). A resumed run
over 230,000 shards spends no task run and no request per shard on done work.

A shard file that exists without a matching index record (a crash between the move and
the index write) is adopted from its own footer when its fingerprint matches: one read
per such file, and the adoption is written to the index at once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from clipbatch.config import EmbedConfig
from clipbatch.errors import ConfigError
from clipbatch.io.storage import check_writable
from clipbatch.models.loading import ResolvedCheckpoint, resolve_checkpoint
from clipbatch.plan.fingerprint import (
    accepted_fingerprints,
    effective_precision,
    shard_fingerprint,
)
from clipbatch.records import FETCH_ERROR, FETCH_TRANSIENT, ShardResult, ShardSpec
from clipbatch.sink.commits.index import IndexView, listed_versions, load_index
from clipbatch.sink.commits.segments import CommitRecord, records_table, utc_stamp, write_segment
from clipbatch.sink.layout import output_uri
from clipbatch.sink.writer import read_file_metadata
from clipbatch.sources.registry import discover

log = logging.getLogger(__name__)

FETCHING_KINDS = frozenset({"table", "folder"})  # sources whose rows fetch their images


@dataclass
class PlanStats:
    """Object-store requests the plan made, by purpose (the scale tests count them too)."""

    source_listings: int = 0
    index_reads: int = 0
    footer_reads: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "source_listings": self.source_listings,
            "index_reads": self.index_reads,
            "footer_reads": self.footer_reads,
        }


@dataclass
class RunPlan:
    """The shards of a run and what to do with each.

    ``config`` is what the shard tasks get: the user's config with the source kind and
    the compute precision resolved, so no task detects either again.
    """

    checkpoint: ResolvedCheckpoint
    shards: list[ShardSpec]
    fingerprints: dict[str, str]
    config: EmbedConfig | None = None
    todo: list[ShardSpec] = field(default_factory=list)
    skipped: list[ShardSpec] = field(default_factory=list)
    retry: list[ShardSpec] = field(default_factory=list)  # committed, with rows to fetch again
    index: IndexView | None = None
    adopted: dict[str, CommitRecord] = field(default_factory=dict)
    stats: PlanStats = field(default_factory=PlanStats)

    def record(self, shard: str) -> CommitRecord | None:
        """The commit record a skipped shard was reused from."""
        if shard in self.adopted:
            return self.adopted[shard]
        return self.index.get(shard) if self.index is not None else None

    def skipped_results(self) -> Iterator[ShardResult]:
        """One result per skipped shard, built on demand (not held for the whole run)."""
        dest = (self.config.sink.url) if self.config is not None else ""
        for shard in self.skipped:
            yield skipped_result(shard, self.record(shard.name), dest)


def model_identity(checkpoint: ResolvedCheckpoint) -> dict[str, Any] | None:
    """The family identity that goes into fingerprints; None for OpenAI-format models."""
    identity = getattr(checkpoint, "fingerprint_identity", None)
    return identity() if callable(identity) else None


@dataclass(frozen=True)
class ShardSlice:
    """Slice ``index`` of ``count``: a contiguous block of the sorted shards.

    Lets ``count`` flow runs (children of a backfill, on a work pool) share one dataset
    and one destination without overlap.
    """

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> ShardSlice:
        head, sep, tail = str(text).partition("/")
        try:
            index, count = int(head), int(tail)
        except ValueError:
            index = count = -1
        if not sep or count < 1 or not 0 <= index < count:
            raise ConfigError(f"shard slice {text!r} must be 'I/N' with 0 <= I < N, e.g. '3/16'")
        return cls(index, count)

    def take(self, shards: list[ShardSpec]) -> list[ShardSpec]:
        n = len(shards)
        return shards[self.index * n // self.count : (self.index + 1) * n // self.count]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def plan_shards(
    config: EmbedConfig,
    shards: list[ShardSpec] | None = None,
    shard_slice: ShardSlice | None = None,
) -> RunPlan:
    """Plan a run: list the source and the destination, and decide each shard (encode, skip, retry failed rows).

    Example::

        from clipbatch.config import build_config
        from clipbatch.plan.planner import plan_shards

        plan = plan_shards(build_config({"source": "data/", "dest": "emb/", "model": "tiny"}))
        len(plan.todo), len(plan.skipped)  # shards to encode, shards already committed
    """
    import torch

    check_writable(config.sink.url, config.sink.storage)
    checkpoint = resolve_checkpoint(config.model)
    stats = PlanStats()
    if shards is None:
        kind, shards = discover(config.source)
        stats.source_listings = 1
    else:
        kind = shards[0].kind if shards else config.source.kind
    if shard_slice is not None:
        shards = shard_slice.take(shards)
    precision = effective_precision(config.runtime, torch.cuda.is_available())
    identity = model_identity(checkpoint)
    context = getattr(checkpoint, "context_length", None)
    fingerprints = {
        s.name: shard_fingerprint(s, config, checkpoint.sha256, precision, identity, context)
        for s in shards
    }
    task_config = config.model_copy(
        update={
            "source": config.source.model_copy(update={"kind": kind}),
            "runtime": config.runtime.model_copy(update={"precision": precision}),
        }
    )
    plan = RunPlan(
        checkpoint=checkpoint,
        shards=shards,
        fingerprints=fingerprints,
        config=task_config,
        stats=stats,
    )
    if config.sink.overwrite:
        plan.todo = list(shards)
        return plan
    listed = listed_versions(config.sink)
    plan.index = load_index(config.sink, listed)
    stats.index_reads = plan.index.requests + 1
    for shard in shards:
        version = listed.get(shard.name)
        if version is None:
            plan.todo.append(shard)
            continue
        current = fingerprints[shard.name]
        recorded = plan.index.fingerprint(shard.name)
        if recorded is None:
            adopted = _adopt(config, shard, version, stats)
            if adopted is not None and adopted.fingerprint in _accepted(
                shard, config, current, checkpoint, identity, kind
            ):
                plan.adopted[shard.name] = adopted
                plan.skipped.append(shard)
            else:
                plan.todo.append(shard)
        elif recorded == current or recorded in _accepted(
            shard, config, current, checkpoint, identity, kind
        ):
            plan.skipped.append(shard)
        else:
            plan.todo.append(shard)
    if plan.adopted:
        log.info("adopting %d committed shard(s) missing from the index", len(plan.adopted))
        name = f"adopt-{utc_stamp()}-{uuid.uuid4().hex[:8]}.parquet"
        write_segment(config.sink, name, records_table(plan.adopted.values()))
    if config.runtime.retry_failed:
        _pick_retries(plan, kind)
    return plan


def _pick_retries(plan: RunPlan, kind: str) -> None:
    """Skipped shards whose committed rows failed to fetch: from the records' per-status
    counts (the index, or the footers adopted), never by reading the files. Only table
    and folder sources fetch images. (Which rows, and whether their attempts are spent,
    the retry reads from the file itself.)"""
    if kind not in FETCHING_KINDS:
        return
    keep = []
    for shard in plan.skipped:
        record = plan.record(shard.name)
        counts = record.counts if record is not None else {}
        if counts.get(FETCH_TRANSIENT) or counts.get(FETCH_ERROR):
            plan.retry.append(shard)
        else:
            keep.append(shard)
    plan.skipped = keep
    if plan.retry:
        log.info("%d committed shard(s) have rows to fetch again", len(plan.retry))


def _accepted(
    shard: ShardSpec,
    config: EmbedConfig,
    current: str,
    checkpoint: ResolvedCheckpoint,
    identity: dict[str, Any] | None,
    kind: str,
) -> set[str]:
    return accepted_fingerprints(shard, config, current, checkpoint.sha256, identity, kind)


def _adopt(
    config: EmbedConfig, shard: ShardSpec, version: str, stats: PlanStats
) -> CommitRecord | None:
    """A record from the committed file's own footer (one read), or None if unreadable."""
    stats.footer_reads += 1
    meta = read_file_metadata(output_uri(config.sink.url, shard.name), config.sink.storage)
    if not meta or not meta.get("fingerprint"):
        return None
    source = meta.get("source") or {}
    return CommitRecord(
        shard=shard.name,
        file=f"{shard.name}.parquet",
        file_version=version,
        fingerprint=str(meta["fingerprint"]),
        rows=int(meta.get("rows") or 0),
        counts=dict(meta.get("counts") or {}),
        sha256=None,
        source_uri=source.get("uri"),
        source_version=source.get("version"),
        run_id=(meta.get("run") or {}).get("run_id"),
    )


def commit_record(result: ShardResult, run_id: str) -> CommitRecord:
    """The index record of a committed shard."""
    return CommitRecord(
        shard=result.shard,
        file=result.output_uri.rsplit("/", 1)[-1],
        file_version=result.file_version,
        fingerprint=result.fingerprint,
        rows=result.rows,
        counts=dict(result.counts),
        sha256=result.sha256,
        source_uri=result.source_uri,
        source_version=result.source_version,
        run_id=run_id,
        committed_at=utc_stamp(),
    )


def skipped_result(shard: ShardSpec, record: CommitRecord | None, dest: str) -> ShardResult:
    record_rows = record.rows if record else 0
    return ShardResult(
        shard=shard.name,
        output_uri=output_uri(dest, shard.name) if dest else "",
        status="skipped",
        rows=int(record_rows or 0),
        counts=dict(record.counts) if record else {},
        fingerprint=record.fingerprint if record else "",
        source_uri=shard.uri,
        source_version=shard.version,
        sha256=record.sha256 if record else None,
        file_version=record.file_version if record else None,
    )
