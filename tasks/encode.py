"""The shard task: one task run encodes and commits a group of shards, each on its own.

Map over shards, never over single images: a task run costs tens of milliseconds and a
few API calls. For huge datasets a task run carries several shards
(``runtime.shards_per_task``), so a flow run over 230,000 shards makes about a thousand
task runs, not 230,000 (prefect#18883); every shard is still committed on its own.

Retries are on the decorator (the flow sets the count and backoff from
``runtime.task_retries`` / ``retry_delay_seconds``), with jitter, and only for transient
errors (:func:`clipbatch.errors.is_transient`). A retry skips the shards an earlier
attempt committed (one footer read each) and goes on from the shard that failed. A
shard that fails for good (bad data over ``max_error_ratio``, bad config) is recorded as
failed and the group goes on; the task then fails without a retry, carrying every
shard's result to the flow.
"""

from __future__ import annotations

from typing import Any

from clipbatch_tasks.credentials import load_credentials
from clipbatch_tasks.retry import retry_on_transient
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.runtime import task_run

from clipbatch.config import EmbedConfig
from clipbatch.errors import ShardTaskError, is_transient
from clipbatch.lineage.transport import transport_configured
from clipbatch.pipeline.devices import run_shard_on_devices
from clipbatch.pipeline.worker import committed_result, failed_result
from clipbatch.records import ShardResult, ShardSpec
from clipbatch.sink.layout import output_uri


def group_name() -> str:
    shards = task_run.get_parameters().get("shards") or []
    if len(shards) <= 1:
        return f"encode-{shards[0].name}" if shards else "encode"
    return f"encode-{shards[0].name}..{shards[-1].name}"


@task(
    name="encode-shards",
    task_run_name=group_name,
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_on_transient,
    cache_policy=NO_CACHE,  # idempotency across runs is ours, by fingerprint
    log_prints=False,
)
def encode_shards(
    shards: list[ShardSpec],
    fingerprints: list[str],
    config: EmbedConfig,
    run_id: str,
    run_meta: dict[str, Any],
    retry_failed: bool = False,
) -> list[ShardResult]:
    """Encode and commit each shard; with ``retry_failed``, fetch the failed rows of each
    (committed) shard again instead (:mod:`clipbatch.pipeline.retry`)."""
    logger = get_run_logger()
    load_credentials(config)  # this process may be a Dask or Ray worker: load blocks here
    retry = (task_run.get_run_count() or 1) > 1
    results: list[ShardResult] = []
    for shard, fingerprint in zip(shards, fingerprints, strict=True):
        if retry and not retry_failed:  # a retry of failed rows is idempotent by itself
            done = committed_result(shard, config, fingerprint)
            if done is not None:
                logger.info("shard %s: committed by an earlier attempt", shard.name)
                results.append(done)
                continue
        try:
            result = encode_one(shard, fingerprint, config, run_id, run_meta, retry_failed)
        except Exception as e:
            if is_transient(e):
                raise ShardTaskError(
                    f"shard {shard.name}: {type(e).__name__}: {e}", results, transient=True
                ) from e
            logger.error("shard %s failed: %s: %s", shard.name, type(e).__name__, e)
            results.append(failed_result(shard, fingerprint, e))
            continue
        results.append(result)
    failed = [r for r in results if r.status == "failed"]
    if failed:
        raise ShardTaskError(
            f"{len(failed)} of {len(results)} shard(s) failed: "
            + "; ".join(f"{r.shard}: {r.error}" for r in failed[:3]),
            results,
            transient=False,
        )
    return results


def encode_one(
    shard: ShardSpec,
    fingerprint: str,
    config: EmbedConfig,
    run_id: str,
    run_meta: dict[str, Any],
    retry_failed: bool = False,
) -> ShardResult:
    """One shard: here, or on a free per-device worker process when runtime.devices is set."""
    logger = get_run_logger()
    logger.info("encoding shard %s (%s)", shard.name, shard.uri)
    # The shard's own OpenLineage run, a child of the flow run (when configured).
    ol = None
    if transport_configured():
        from clipbatch.lineage.openlineage.shard import ShardLineage

        ol = ShardLineage(
            shard, config, run_meta, task_run.get_id(), output_uri(config.sink.url, shard.name)
        )
        ol.start()
    try:
        result = run_shard_on_devices(shard, config, run_id, fingerprint, run_meta, retry_failed)
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
