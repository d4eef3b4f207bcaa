"""Library-level entry points: per-process contexts, one shard, and a plain loop over a plan.

The Prefect tasks call :func:`run_shard`; :func:`run_plan` is the same work without
Prefect (benchmarks, tests, embedding from a notebook), including the commit index.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from clipbatch.config import EmbedConfig
from clipbatch.encode.encoder import ClipEncoder
from clipbatch.faults import crash_point
from clipbatch.models.loading import load_model
from clipbatch.pipeline.shard import ProgressFn, ShardContext, process_shard
from clipbatch.plan.planner import RunPlan, commit_record
from clipbatch.records import ShardResult, ShardSpec
from clipbatch.sink.commits import IndexWriter
from clipbatch.sources import get_reader

log = logging.getLogger(__name__)

_progress: ProgressFn | None = None


def set_progress_listener(fn: ProgressFn | None) -> None:
    """Register a callback for rows done (the CLI's progress bar). Process-wide."""
    global _progress
    _progress = fn


def progress_listener() -> ProgressFn | None:
    """The registered rows-done callback, if any (device workers forward to it)."""
    return _progress


def shard_context(
    config: EmbedConfig,
    run_id: str,
    run_meta: dict[str, Any] | None = None,
    kind: str | None = None,
) -> ShardContext:
    """Reader, model and encoder for ``config``. The model is loaded once per process.

    ``kind`` is the source kind the plan resolved; a shard task never lists the dataset.
    """
    loaded = load_model(config.model, config.runtime.device, config.runtime.precision)
    encoder = ClipEncoder(loaded, config.runtime.batch_size, config.model.max_caption_tokens)
    return ShardContext(
        config=config,
        reader=get_reader(config.source, kind),
        loaded=loaded,
        encoder=encoder,
        run_id=run_id,
        run_meta=dict(run_meta or {}),
        progress=_progress,
    )


def run_shard(
    shard: ShardSpec,
    config: EmbedConfig,
    run_id: str,
    fingerprint: str,
    run_meta: dict[str, Any] | None = None,
) -> ShardResult:
    """Encode and commit one shard. Its index record is written by whoever collects the
    result (the flow, or :func:`run_plan`), in batches: see :mod:`clipbatch.sink.commits`."""
    ctx = shard_context(config, run_id, run_meta, shard.kind)
    result = process_shard(shard, ctx, fingerprint)
    crash_point("before_index", shard.name)
    return result


def run_plan(
    plan: RunPlan,
    run_id: str,
    on_result: Callable[[ShardResult], None] | None = None,
) -> list[ShardResult]:
    """Run every shard the plan has to do, in this process, and index the commits."""
    assert plan.config is not None
    index = IndexWriter(plan.config.sink, run_id)
    results = []
    try:
        for shard in plan.todo:
            result = run_shard(shard, plan.config, run_id, plan.fingerprints[shard.name])
            index.add(commit_record(result, run_id))
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        index.close()
    return results


def committed_result(shard: ShardSpec, config: EmbedConfig, fingerprint: str) -> ShardResult | None:
    """The result of ``shard`` if its file is already committed with ``fingerprint``.

    A retried task asks this for each of its shards (a footer read and a HEAD), so it
    goes on where the failed attempt stopped instead of redoing committed shards.
    """
    from clipbatch.io.storage import get_fs, with_retries
    from clipbatch.sink.commits import file_version
    from clipbatch.sink.writer import output_uri, read_file_metadata

    uri = output_uri(config.sink.url, shard.name)
    meta = read_file_metadata(uri, config.sink.storage)
    if not meta or meta.get("fingerprint") != fingerprint:
        return None
    fs, path = get_fs(uri, config.sink.storage)
    try:
        info = with_retries(lambda: fs.info(path), f"stat {uri}")
    except FileNotFoundError:
        return None
    return ShardResult(
        shard=shard.name,
        output_uri=uri,
        status="committed",
        rows=int(meta.get("rows") or 0),
        counts=dict(meta.get("counts") or {}),
        fingerprint=fingerprint,
        source_uri=shard.uri,
        source_version=shard.version,
        file_version=file_version(info, fs, path),
    )


def failed_result(shard: ShardSpec, fingerprint: str, error: BaseException | str) -> ShardResult:
    message = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return ShardResult(
        shard=shard.name,
        output_uri="",
        status="failed",
        source_uri=shard.uri,
        source_version=shard.version,
        fingerprint=fingerprint,
        error=message,
    )
