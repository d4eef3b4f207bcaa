"""The curation task: bring one selection of a root up to date (one task run).

Retries are for transient storage errors only. A retry starts from what is committed:
the selection's ``state.json`` is written once, after every new shard is staged, and
staged shards of an attempt that failed before it are removed, never published.
"""

from __future__ import annotations

from typing import Any

from clipbatch_tasks.credentials import load_storage_credentials
from clipbatch_tasks.retry import ROOT_JOB_OPTIONS
from prefect import task
from prefect.logging import get_run_logger

from clipbatch.config import StorageOptions
from clipbatch.curate.spec import CurationSpec


@task(
    name="curate-selection",
    task_run_name="curate-{spec.name}",
    **ROOT_JOB_OPTIONS,
)
def curate_selection(
    root: str, spec: CurationSpec, storage: StorageOptions, run_meta: dict[str, Any]
) -> dict[str, Any]:
    """Decide the new rows of ``root`` by ``spec`` and ship the kept ones as shards."""
    from clipbatch.curate.run import curate_root

    logger = get_run_logger()
    load_storage_credentials([storage, spec.output.storage])
    report = curate_root(root, spec, storage, run_meta)
    logger.info(
        "selection %s: %d file(s) decided, kept %d, dropped %d %s; %d shard(s) published "
        "(%.1f MB); %d file(s) waiting for judgements; stages %s",
        spec.name, report.files_decided, report.kept, report.dropped, dict(report.reasons),
        len(report.shards), report.image_bytes / 1e6, len(report.files_waiting), report.seconds,
    )  # fmt: skip
    return report.as_dict()
