"""``embed_dataset``: list shards, skip done ones, map ``encode_shards`` over the rest.

The one parameter is :class:`clipbatch.config.EmbedConfig`, which the Prefect UI renders
as a form. The flow stays thin: planning, encoding and committing live in the library.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any

from clipbatch_flows.observers import make_observers
from clipbatch_flows.params import resolve_config
from clipbatch_flows.partitions import scheduled_start_time
from clipbatch_flows.run_meta import current_run_meta
from clipbatch_flows.runners import shard_submitter
from clipbatch_tasks.credentials import load_credentials
from clipbatch_tasks.encode import encode_shards
from prefect import flow
from prefect.exceptions import TerminationSignal
from prefect.futures import PrefectFuture, as_completed
from prefect.logging import get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff
from pydantic import Field

from clipbatch.config import EmbedConfig
from clipbatch.errors import RunStopped, ShardTaskError
from clipbatch.pipeline.devices import device_slots
from clipbatch.pipeline.summary import RunFailedError, RunSummary
from clipbatch.pipeline.worker import committed_result, failed_result
from clipbatch.plan.planner import ShardSlice, commit_record, plan_shards
from clipbatch.plan.preflight import preflight
from clipbatch.records import ShardResult, ShardSpec
from clipbatch.sink.commits.writer import IndexWriter
from clipbatch.sink.staging import clean_staging, remove_empty_tmp
from clipbatch.window import completed

# Task runs in flight are bounded by config.runtime.shard_concurrency (a sliding window
# below); the runner's own bound only caps threads.
MAX_TASK_THREADS = 64
# Past this many shards, shards are grouped so a flow run makes about this many task runs.
MAX_TASK_RUNS = 1000


@flow(
    name="embed-dataset",
    task_runner=ThreadPoolTaskRunner(max_workers=MAX_TASK_THREADS),
    validate_parameters=True,
    log_prints=False,
)
def embed_dataset(
    config: EmbedConfig | None = None,
    source: str | None = None,
    dest: str | None = None,
    model: str | None = None,
    device: str | None = None,
    overwrite: bool | None = None,
    retry_failed: bool | None = None,
    partition: str | None = None,
    partition_timezone: str = "UTC",
    partition_offset_days: Annotated[int, Field(ge=-366, le=366)] = 0,
    shard_slice: Annotated[str | None, Field(pattern=r"^\d+/\d+$")] = None,
) -> dict[str, Any]:
    """Embed every shard of ``config.source`` into Parquet at ``config.sink.url``.

    ``config`` is the full form; the flat parameters override parts of it, so
    ``prefect deployment run ... --param source=... --param dest=...`` works alone.

    Args:
        config: The full run configuration (source, sink, model, runtime).
        source: Overrides config.source.url; may hold {date} or {partition}.
        dest: Overrides config.sink.url; may hold {date} or {partition}.
        model: Overrides config.model.name (ViT-B/32, tiny, a checkpoint path or URI).
        device: Overrides config.runtime.device (auto, cpu, cuda, cuda:N).
        overwrite: Overrides config.sink.overwrite (redo shards whose output is current).
        retry_failed: Overrides config.runtime.retry_failed: fetch again the rows of
            committed shards whose images failed for a transient reason (only those).
        partition: Fills {partition} and {date} in the URLs; default: the scheduled date.
        partition_timezone: IANA timezone the scheduled start is read in (Europe/Berlin).
        partition_offset_days: Days added to the scheduled date; -1 embeds the day before.
        shard_slice: 'I/N': only the I-th of N contiguous blocks of the sorted shards, so
            N runs (a backfill's children) share one dataset and destination.
    """
    logger = get_run_logger()
    run = resolve_config(
        config,
        {
            "source": source,
            "dest": dest,
            "model": model,
            "device": device,
            "overwrite": overwrite,
            "retry_failed": retry_failed,
        },
        partition,
        partition_timezone,
        partition_offset_days,
        scheduled_start_time(),
    )
    config = run.config
    load_credentials(config)  # Prefect blocks named by storage.credentials_block, in memory
    if run.partition:
        logger.info("partition %s: %s -> %s", run.partition, config.source.url, config.sink.url)
    meta = current_run_meta()
    run_id = meta["flow_run_id"] or uuid.uuid4().hex
    preflight(config, source=False)  # dest, model name, device: before anything touches dest
    removed = clean_staging(config.sink)
    if removed:
        logger.info("removed %d stale staging folder(s) under %s/_tmp", removed, config.sink.url)
    part = ShardSlice.parse(shard_slice) if shard_slice else None
    plan = plan_shards(config, shard_slice=part)
    if part is not None:
        logger.info("shard slice %s: %d shard(s)", part, len(plan.shards))
    config = plan.config or config  # the source kind and compute precision, resolved once
    observers = make_observers(config, {**meta, "run_id": run_id})
    observers.run_started(plan)
    summary = RunSummary(dest=config.sink.url, run_id=run_id)
    for skipped in plan.skipped_results():
        observers.shard_finished(skipped)
        summary.add(skipped)
    groups = [(g, False) for g in shard_groups(plan.todo, config.runtime.shards_per_task)]
    groups += [(g, True) for g in shard_groups(plan.retry, config.runtime.shards_per_task)]
    if plan.retry:
        logger.info("%d committed shard(s) have failed rows to fetch again", len(plan.retry))
    logger.info(
        "%d shard(s): %d to encode in %d task run(s), %d already done (model %s, sha256 %s…)",
        len(plan.shards),
        len(plan.todo),
        len(groups),
        len(plan.skipped),
        plan.checkpoint.display_name,
        plan.checkpoint.sha256[:12],
    )
    task = encode_shards.with_options(
        retries=config.runtime.task_retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=config.runtime.retry_delay_seconds),
    )
    index = IndexWriter(config.sink, run_id)
    start = time.perf_counter()

    def finished(result: ShardResult) -> None:
        # Per shard, as it finishes: the index, the run record and progress advance.
        if result.status == "committed":
            index.add(commit_record(result, run_id))
        observers.shard_finished(result)
        summary.add(result)

    try:
        # The thread pool, or a Dask/Ray cluster when config.runtime.task_runner names one.
        with shard_submitter(task, config.runtime) as submitter:
            window = max(config.runtime.shard_concurrency, device_slots(config.runtime.devices))
            _run_windowed(
                submitter, groups, window, plan.fingerprints, config, run_id, meta, finished
            )
    except BaseException as e:  # crashed or cancelled: lineage still says how far it got
        _close_quietly(index)
        observers.run_finished(summary, _stopped(e))
        raise
    index.close()
    remove_empty_tmp(config.sink)  # no empty bookkeeping left behind
    summary.seconds = time.perf_counter() - start
    logger.info(
        "done: %d committed, %d skipped, %d failed; %d rows (%d ok) at %.1f images/s",
        summary.committed,
        summary.skipped,
        summary.failures,
        summary.rows_written,
        summary.rows_ok,
        summary.images_per_second(),
    )
    error = RunFailedError(summary) if summary.failures else None
    observers.run_finished(summary, error)
    if error:
        raise error
    return summary.to_dict()


def _stopped(error: BaseException) -> BaseException:
    """A stop from outside (Prefect's TerminationSignal on SIGTERM, a cancellation,
    SIGINT) as :class:`RunStopped`, which run records call cancelled, not failed."""
    if isinstance(error, TerminationSignal | KeyboardInterrupt | RunStopped):
        return RunStopped(f"stopped by {type(error).__name__}")
    return error


def shard_groups(shards: list[ShardSpec], per_task: int) -> list[list[ShardSpec]]:
    """Consecutive groups of shards, one task run each.

    ``per_task`` 0 (the default) keeps one shard per task run up to ``MAX_TASK_RUNS``
    shards, then groups them so that a flow run makes about ``MAX_TASK_RUNS`` task runs.
    """
    if not shards:
        return []
    size = per_task or max(1, math.ceil(len(shards) / MAX_TASK_RUNS))
    return [shards[i : i + size] for i in range(0, len(shards), size)]


def _close_quietly(index: IndexWriter) -> None:
    """Record what was committed before a crash or cancel; the next run adopts the rest."""
    try:
        index.close(compact=False)
    except Exception as e:  # noqa: BLE001 - the original error matters more
        get_run_logger().warning("could not write the commit index: %s", e)


def _run_windowed(
    task: Any,
    groups: list[tuple[list[ShardSpec], bool]],
    window: int,
    fingerprints: dict[str, str],
    config: EmbedConfig,
    run_id: str,
    meta: dict[str, Any],
    finished: Callable[[ShardResult], None],
) -> None:
    """Submit groups with at most ``window`` task runs in flight; report every shard."""

    # The shards of each task run (not retries of failed rows) not yet reported; a shard
    # leaves as it is reported, so a stop at any point counts each shard once.
    unreported: dict[PrefectFuture, dict[str, ShardSpec]] = {}

    def start(item: tuple[list[ShardSpec], bool]) -> PrefectFuture:
        group, retry = item
        fps = [fingerprints[s.name] for s in group]
        future = task.submit(group, fps, config, run_id, meta, retry_failed=retry)
        if not retry:
            unreported[future] = {s.name: s for s in group}
        return future

    def first_done(futures: list[PrefectFuture]) -> PrefectFuture:
        return next(as_completed(futures))

    try:
        for (group, _), done in completed(groups, start, window, first_done):
            done.wait()
            if done.state.is_completed():
                results = list(done.result())
            else:
                try:
                    exc = done.result(raise_on_failure=False)
                except Exception as e:  # noqa: BLE001 - e.g. Dask's KilledWorker: no state
                    exc = e
                results = group_failure(group, fingerprints, exc, done.state)
            for result in results:
                unreported.get(done, {}).pop(result.shard, None)
                finished(result)
            unreported.pop(done, None)
    except BaseException:
        # Stopped or crashed: a task run may have committed shards whose results never
        # came back. Count them, so the run record says how far the run really got.
        left = [shard for shards in unreported.values() for shard in shards.values()]
        for result in committed_in_flight(left, fingerprints, config):
            finished(result)
        raise


def committed_in_flight(
    shards: list[ShardSpec], fingerprints: dict[str, str], config: EmbedConfig
) -> list[ShardResult]:
    """Those of ``shards`` (of unfinished task runs) whose output is already committed.

    A footer read and a HEAD per shard in flight (bounded by the window, not by the
    dataset). When storage fails, checking stops there (one retry sequence, not one per
    shard): the next run adopts what was committed anyway.
    """
    found: list[ShardResult] = []
    for shard in shards:
        try:
            result = committed_result(shard, config, fingerprints[shard.name])
        except Exception:  # noqa: BLE001 - the stop or crash matters more than the count
            break
        if result is not None:
            found.append(result)
    return found


def group_failure(
    group: list[ShardSpec], fingerprints: dict[str, str], exc: Any, state: Any
) -> list[ShardResult]:
    """Every shard's result from a failed task run: what it reported, failed for the rest."""
    known = list(exc.results) if isinstance(exc, ShardTaskError) else []
    done = {r.shard for r in known}
    reason = (
        f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(state.message)
    )
    return known + [
        failed_result(s, fingerprints[s.name], reason) for s in group if s.name not in done
    ]
