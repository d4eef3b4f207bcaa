"""The per-process worker, one shard, and a plain loop over a plan.

A :class:`Worker` is what a process reuses across shards: the loaded model, the encoder
(its tokenizer, and the batch size it learned: probed once with ``--batch-size auto``,
kept after an out-of-memory halving), the readers, and the progress hook. One is built
per setup and process, on first use, and every later shard of that setup uses it: the
Prefect task calls :func:`run_shard`; :func:`run_plan` is the same work without Prefect
(benchmarks, tests, a notebook), commit index included.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from clipbatch.config import EmbedConfig, SourceConfig
from clipbatch.encode.encoder import ClipEncoder
from clipbatch.faults import crash_point
from clipbatch.models.loading import LoadedModel, load_model
from clipbatch.pipeline.retry import retry_shard
from clipbatch.pipeline.shard import ShardContext, process_shard
from clipbatch.plan.planner import RunPlan, commit_record
from clipbatch.process import process_context
from clipbatch.records import ShardResult, ShardSpec
from clipbatch.settings import allow_image_pixels
from clipbatch.sink.commits.writer import IndexWriter
from clipbatch.sink.staging import remove_empty_tmp
from clipbatch.sources.base import ShardReader
from clipbatch.sources.registry import get_reader

log = logging.getLogger(__name__)


class Worker:
    """Model, encoder, readers and learned batch size for one setup, in one process."""

    def __init__(self, config: EmbedConfig) -> None:
        runtime = config.runtime
        allow_image_pixels(runtime.max_image_pixels)
        self.loaded: LoadedModel = load_model(config.model, runtime.device, runtime.precision)
        self.encoder = ClipEncoder(self.loaded, runtime.batch_size, config.model.max_caption_tokens)
        if runtime.auto_batch_size:  # probed once per worker; later shards reuse it
            self.encoder.find_batch_size(start=runtime.batch_size)
        self._readers: dict[tuple[str, str], ShardReader] = {}

    @staticmethod
    def key(config: EmbedConfig) -> tuple[Any, ...]:
        """What decides a worker's setup: the model, where it runs, and how it batches."""
        runtime = config.runtime
        return (
            config.model.model_dump_json(),
            runtime.device,
            runtime.precision,
            runtime.batch_size,
            runtime.auto_batch_size,
            runtime.max_image_pixels,
        )

    def reader(self, source: SourceConfig, kind: str | None) -> ShardReader:
        key = (source.model_dump_json(), kind or source.kind)
        if key not in self._readers:
            self._readers[key] = get_reader(source, kind)
        return self._readers[key]

    def context(
        self, config: EmbedConfig, run_id: str, run_meta: dict[str, Any] | None, kind: str | None
    ) -> ShardContext:
        return ShardContext(
            config=config,
            reader=self.reader(config.source, kind),
            loaded=self.loaded,
            encoder=self.encoder,
            run_id=run_id,
            run_meta=dict(run_meta or {}),
            progress=process_context().progress,
        )


def worker_for(config: EmbedConfig) -> Worker:
    """This process's worker for ``config``'s setup, built on first use."""
    process = process_context()
    key = Worker.key(config)
    with process.lock:
        worker = process.workers.get(key)
        if worker is None:
            worker = process.workers[key] = Worker(config)
        return worker


def shard_context(
    config: EmbedConfig,
    run_id: str,
    run_meta: dict[str, Any] | None = None,
    kind: str | None = None,
) -> ShardContext:
    """A shard's context from this process's worker (``kind``: the plan's resolved kind)."""
    return worker_for(config).context(config, run_id, run_meta, kind)


def run_shard(
    shard: ShardSpec,
    config: EmbedConfig,
    run_id: str,
    fingerprint: str,
    run_meta: dict[str, Any] | None = None,
    retry: bool = False,
) -> ShardResult:
    """Encode and commit one shard (``retry``: fetch its failed rows again, see
    :mod:`clipbatch.pipeline.retry`). Its index record is written by whoever collects the
    result (the flow, or :func:`run_plan`), in batches: see :mod:`clipbatch.sink.commits`."""
    ctx = shard_context(config, run_id, run_meta, shard.kind)
    if retry:
        result = retry_shard(shard, ctx, fingerprint, config.runtime.max_fetch_attempts)
    else:
        result = process_shard(shard, ctx, fingerprint)
    crash_point("before_index", shard.name)
    return result


def run_plan(
    plan: RunPlan,
    run_id: str,
    on_result: Callable[[ShardResult], None] | None = None,
) -> list[ShardResult]:
    """Run every shard the plan has to do, in this process, and index the commits.

    Example::

        from clipbatch.pipeline.worker import run_plan

        results = run_plan(plan, run_id="my-run")  # plan from plan_shards(config)
        sum(r.rows for r in results), sum(r.failed_rows for r in results)
    """
    assert plan.config is not None
    index = IndexWriter(plan.config.sink, run_id)
    results = []
    work = [(s, False) for s in plan.todo] + [(s, True) for s in plan.retry]
    try:
        for shard, retry in work:
            result = run_shard(
                shard, plan.config, run_id, plan.fingerprints[shard.name], retry=retry
            )
            if result.status == "committed":
                index.add(commit_record(result, run_id))
            results.append(result)
            if on_result is not None:
                on_result(result)
    finally:
        index.close()
    remove_empty_tmp(plan.config.sink)
    return results


def committed_result(shard: ShardSpec, config: EmbedConfig, fingerprint: str) -> ShardResult | None:
    """The result of ``shard`` if its file is already committed with ``fingerprint``.

    A retried task asks this for each of its shards (a footer read and a HEAD), so it
    goes on where the failed attempt stopped instead of redoing committed shards.
    """
    from clipbatch.io.retry import with_retries
    from clipbatch.io.storage import get_fs
    from clipbatch.sink.commits.segments import file_version
    from clipbatch.sink.layout import output_uri
    from clipbatch.sink.writer import read_file_metadata

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
