"""The index task: build or update one kNN index of a table root (one task run each).

Retries are for transient storage errors only (the same rule as the shard task); a
retry starts the build again from the committed index, which a failed attempt never
touched (the new build becomes visible only when its pointer is written).
"""

from __future__ import annotations

from typing import Any

from clipbatch_tasks.credentials import load_storage_credentials
from clipbatch_tasks.retry import ROOT_JOB_OPTIONS
from prefect import task
from prefect.logging import get_run_logger

from clipbatch.config import StorageOptions
from clipbatch.knn.build import build_or_skip
from clipbatch.knn.policy import IndexSettings


@task(
    name="build-knn-index",
    task_run_name="index-{name}",
    **ROOT_JOB_OPTIONS,
)
def build_knn_index(
    root: str,
    name: str,
    settings: IndexSettings,
    storage: StorageOptions,
    run_meta: dict[str, Any],
    required: bool,
) -> dict[str, Any]:
    logger = get_run_logger()
    load_storage_credentials([storage])
    report = build_or_skip(root, name, required, settings, storage, run_meta)
    if report.mode == "skipped":
        logger.info("_knn/%s skipped: %s", name, "; ".join(report.reasons))
        return report.as_dict()
    logger.info(
        "_knn/%s %s: %d vectors (+%d -%d) from %d files in %.1f s%s",
        name,
        report.mode,
        report.vectors,
        report.added,
        report.removed,
        report.files,
        report.seconds,
        f" ({', '.join(report.reasons)})" if report.reasons else "",
    )
    return report.as_dict()
