"""The judgement tasks: one head over a root, or SemDeDup over a root (one task run each).

A root's judgements are incremental (only new and rewritten shard files are judged), so
a retry after a transient storage error starts again from what is committed: files a
failed attempt wrote whole are found current, and its index was never written.
"""

from __future__ import annotations

from typing import Any

from clipbatch_tasks.credentials import load_storage_credentials
from clipbatch_tasks.retry import ROOT_JOB_OPTIONS
from prefect import task
from prefect.logging import get_run_logger

from clipbatch.config import StorageOptions
from clipbatch.judge.semdedup import SemDedupSettings


@task(
    name="score-with-head",
    task_run_name="score-{head}",
    **ROOT_JOB_OPTIONS,
)
def score_with_head(
    root: str, head: str, storage: StorageOptions, run_meta: dict[str, Any]
) -> dict[str, Any]:
    """Score the new and rewritten files under ``root`` with the head ``head`` names."""
    from clipbatch.heads.registry import load_head
    from clipbatch.judge.score import score_root

    logger = get_run_logger()
    load_storage_credentials([storage])
    (report,) = score_root(root, [load_head(head)], storage, run_meta).heads
    logger.info(
        "_scores/%s: %d file(s) scored (%d rows), %d current, in %.1f s",
        report.head, report.files_scored, report.rows, report.files_current, report.seconds,
    )  # fmt: skip
    return {"kind": "head", "ref": head, **report.as_dict()}


@task(
    name="semdedup",
    task_run_name="semdedup-{settings.eps}",
    **ROOT_JOB_OPTIONS,
)
def group_duplicates(
    root: str, settings: SemDedupSettings, storage: StorageOptions, run_meta: dict[str, Any]
) -> dict[str, Any]:
    """SemDeDup over ``root``: the new rows' duplicate groups, against every earlier row."""
    from clipbatch.judge.semdedup import semdedup_root

    logger = get_run_logger()
    load_storage_credentials([storage])
    report = semdedup_root(root, settings, storage, run_meta)
    logger.info(
        "_scores/%s: %d new file(s) (%d rows), %d ranked after an earlier duplicate, "
        "%d clusters%s, in %.1f s",
        report.name, report.files_new, report.rows_new, report.duplicates_new, report.clusters,
        " (trained)" if report.trained else "", report.seconds,
    )  # fmt: skip
    return {"kind": "semdedup", **report.as_dict()}
