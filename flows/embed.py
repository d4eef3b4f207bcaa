"""``embed_dataset``: list shards, skip done ones, map ``encode_shard`` over the rest.

The one parameter is :class:`clipbatch.config.EmbedConfig`, which the Prefect UI renders
as a form. The flow stays thin: planning, encoding and committing live in the library.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any

from prefect import flow
from prefect.futures import PrefectFuture, as_completed
from prefect.logging import get_run_logger
from prefect.runtime import deployment, flow_run
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.tasks import exponential_backoff
from pydantic import Field

from clipbatch.config import EmbedConfig
from clipbatch.multigpu import device_slots
from clipbatch.observe import Observers
from clipbatch.plan import plan_shards
from clipbatch.records import ShardResult, ShardSpec
from clipbatch.sink import clean_staging
from clipbatch.summary import RunFailedError, RunSummary
from flows.observers import make_observers
from flows.params import resolve_config
from flows.partitions import scheduled_start_time
from flows.runners import shard_submitter
from tasks.encode import encode_shard

# Shards in flight are bounded by config.runtime.shard_concurrency (a sliding window
# below); the runner's own bound only caps threads.
MAX_TASK_THREADS = 64


def current_run_meta() -> dict[str, Any]:
    """Prefect identifiers for lineage: flow run, deployment, parent run."""
    return {
        "flow_run_id": flow_run.get_id(),
        "flow_run_name": flow_run.get_name(),
        "flow_name": flow_run.get_flow_name(),
        "deployment_id": deployment.get_id(),
        "deployment_name": deployment.get_name(),
        "parent_flow_run_id": flow_run.get_parent_flow_run_id(),
        "scheduled_start_time": str(flow_run.get_scheduled_start_time() or "") or None,
    }


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
    partition: str | None = None,
    partition_timezone: str = "UTC",
    partition_offset_days: Annotated[int, Field(ge=-366, le=366)] = 0,
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
        partition: Fills {partition} and {date} in the URLs; default: the scheduled date.
        partition_timezone: IANA timezone the scheduled start is read in (Europe/Berlin).
        partition_offset_days: Days added to the scheduled date; -1 embeds the day before.
    """
    logger = get_run_logger()
    run = resolve_config(
        config,
        {"source": source, "dest": dest, "model": model, "device": device, "overwrite": overwrite},
        partition,
        partition_timezone,
        partition_offset_days,
        scheduled_start_time(),
    )
    config = run.config
    if run.partition:
        logger.info("partition %s: %s -> %s", run.partition, config.source.url, config.sink.url)
    meta = current_run_meta()
    run_id = meta["flow_run_id"] or uuid.uuid4().hex
    removed = clean_staging(config.sink)
    if removed:
        logger.info("removed %d stale staging folder(s) under %s/_tmp", removed, config.sink.url)
    plan = plan_shards(config)
    observers = make_observers(config, {**meta, "run_id": run_id})
    observers.run_started(plan)
    for skipped in plan.skipped:
        observers.shard_finished(skipped)
    logger.info(
        "%d shard(s): %d to encode, %d already done (model %s, sha256 %s…)",
        len(plan.shards),
        len(plan.todo),
        len(plan.skipped),
        plan.checkpoint.display_name,
        plan.checkpoint.sha256[:12],
    )
    task = encode_shard.with_options(
        retries=config.runtime.task_retries,
        retry_delay_seconds=exponential_backoff(backoff_factor=config.runtime.retry_delay_seconds),
    )
    start = time.perf_counter()
    try:
        # The thread pool, or a Dask/Ray cluster when config.runtime.task_runner names one.
        with shard_submitter(task, config.runtime) as submitter:
            results = _run_windowed(
                submitter, plan.todo, config, run_id, plan.fingerprints, meta, observers
            )
    except BaseException as e:  # crashed or cancelled: lineage still says how far it got
        observers.run_finished(
            RunSummary(dest=config.sink.url, run_id=run_id, results=plan.skipped), e
        )
        raise
    summary = RunSummary(dest=config.sink.url, run_id=run_id, results=plan.skipped + results)
    summary.seconds = time.perf_counter() - start
    logger.info(
        "done: %d committed, %d skipped, %d failed; %d rows (%d ok) at %.1f images/s",
        len(summary.committed),
        len(summary.skipped),
        len(summary.failed),
        summary.rows_written(),
        summary.ok_rows(),
        summary.images_per_second(),
    )
    error = RunFailedError(summary) if summary.failed else None
    observers.run_finished(summary, error)
    if error:
        raise error
    return summary.to_dict()


def _run_windowed(
    task: Any,
    shards: list[ShardSpec],
    config: EmbedConfig,
    run_id: str,
    fingerprints: dict[str, str],
    meta: dict[str, Any],
    observers: Observers,
) -> list[ShardResult]:
    """Submit shards with at most ``shard_concurrency`` in flight; collect every outcome."""
    # With per-device workers, at least one shard in flight per device keeps them all busy.
    window = max(config.runtime.shard_concurrency, device_slots(config.runtime.devices))
    in_flight: dict[PrefectFuture, ShardSpec] = {}
    results: dict[str, ShardResult] = {}

    def collect(done: PrefectFuture) -> None:
        shard = in_flight.pop(done)
        done.wait()
        state = done.state
        if state.is_completed():
            results[shard.name] = done.result()
        else:
            try:
                exc = done.result(raise_on_failure=False)
            except Exception as e:  # noqa: BLE001 - e.g. Dask's KilledWorker: no state came back
                exc = e
            results[shard.name] = ShardResult(
                shard=shard.name,
                output_uri="",
                status="failed",
                source_uri=shard.uri,
                source_version=shard.version,
                fingerprint=fingerprints[shard.name],
                error=f"{type(exc).__name__}: {exc}"
                if isinstance(exc, BaseException)
                else str(state.message),
            )
        # Per shard, as it finishes: the run record and progress advance during the run.
        observers.shard_finished(results[shard.name])

    for shard in shards:
        while len(in_flight) >= window:
            collect(next(as_completed(list(in_flight))))
        future = task.submit(shard, config, run_id, fingerprints[shard.name], meta)
        in_flight[future] = shard
    while in_flight:
        collect(next(as_completed(list(in_flight))))
    return [results[s.name] for s in shards]
