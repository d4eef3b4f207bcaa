"""The shard task: one task run encodes and commits one whole shard.

Map over shards, never over single images: a task run costs tens of milliseconds.
Retries are on the decorator, with exponential backoff and jitter, and only for
transient errors (see :func:`clipbatch.errors.is_transient`).
"""

from __future__ import annotations

from typing import Any

from prefect import Task, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.objects import TaskRun
from prefect.logging import get_run_logger
from prefect.runtime import task_run
from prefect.states import State
from prefect.tasks import exponential_backoff

from clipbatch.config import EmbedConfig
from clipbatch.errors import is_transient
from clipbatch.lineage.transport import transport_configured
from clipbatch.multigpu import run_shard_on_devices
from clipbatch.records import ShardResult, ShardSpec
from clipbatch.sink import output_uri


def retry_on_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry network faults, throttling and lost workers; never bad data or bad config."""
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - we classify, not handle
        return is_transient(e)
    return False


@task(
    name="encode-shard",
    task_run_name="encode-{shard.name}",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_transient,
    cache_policy=NO_CACHE,  # idempotency across runs is ours, by fingerprint
    log_prints=False,
)
def encode_shard(
    shard: ShardSpec, config: EmbedConfig, run_id: str, fingerprint: str, run_meta: dict[str, Any]
) -> ShardResult:
    logger = get_run_logger()
    logger.info("encoding shard %s (%s)", shard.name, shard.uri)
    # The shard's own OpenLineage run, a child of the flow run (when configured).
    ol = None
    if transport_configured():
        from clipbatch.lineage.openlineage import ShardLineage

        ol = ShardLineage(
            shard, config, run_meta, task_run.get_id(), output_uri(config.sink.url, shard.name)
        )
        ol.start()
    try:
        # Here, or on a free per-device worker process when runtime.devices is set.
        result = run_shard_on_devices(shard, config, run_id, fingerprint, run_meta)
    except BaseException as e:
        if ol is not None:
            ol.fail(e)
        raise
    if ol is not None:
        ol.complete(result)
    logger.info(
        "shard %s: %d rows (%d ok, %d failed) in %.1fs",
        shard.name,
        result.rows,
        result.ok_rows,
        result.failed_rows,
        result.seconds,
    )
    return result
