"""``score``: judge every row of a table root from its embeddings, incrementally.

Heads (LAION's aesthetic and NSFW predictors, a user's own) write
``{table}/_scores/{head}/``; SemDeDup writes ``{table}/_scores/semdedup-{eps}/``. Only new
and rewritten shard files are judged, so a nightly run costs what the night added.

Started by hand::

    prefect deployment run 'score/score' --param root=s3://bucket/emb \
        --param heads='["aesthetic-laion-v2"]'

or by the deployment's trigger on ``clipbatch.run.completed`` (after each embed run that
wrote something). One judging job per root at a time: the flow holds its root's
``clipbatch-judge-…`` limit (:mod:`clipbatch_flows.limits`), which curation holds too.
"""

from __future__ import annotations

from typing import Annotated, Any

from clipbatch_flows.limits import ensure_root_limit, root_limit_name
from clipbatch_flows.run_meta import current_run_meta
from clipbatch_tasks.judge import group_duplicates, score_with_head
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.concurrency.sync import concurrency
from prefect.logging import get_run_logger
from pydantic import Field

from clipbatch.config import StorageOptions
from clipbatch.judge.semdedup import SemDedupSettings

SCORE_KEY = "clipbatch-scores"


@flow(name="score", validate_parameters=True, log_prints=False)
def score_flow(
    root: str,
    heads: list[str] | None = None,
    semdedup: bool = True,
    eps: Annotated[float, Field(gt=0, lt=1)] = 0.05,
    clusters: Annotated[int | None, Field(ge=1)] = None,
    rebuild: bool = False,
    storage: StorageOptions | None = None,
) -> list[dict[str, Any]]:
    """Score the rows under ``root`` with ``heads``, and group their duplicates.

    Args:
        root: The table, or the partition root of nightly ``date=…/`` tables.
        heads: Heads by name (aesthetic-laion-v2), name=PATH (local weights, e.g. a
            converted nsfw-laion-b32=/models/nsfw-b32.safetensors) or PATH.json (a
            user's head), as the worker sees the paths.
        semdedup: Group near-duplicate images across the root (SemDeDup).
        eps: SemDeDup's cosine distance under which two images are duplicates.
        clusters: SemDeDup's k-means clusters (default about one per 1,000 rows).
        rebuild: Train SemDeDup's clusters again and regroup every row.
        storage: How to reach the store (endpoint, profile, credentials block).
    """
    logger = get_run_logger()
    storage = storage or StorageOptions()
    meta = current_run_meta()
    settings = SemDedupSettings(eps=eps, clusters=clusters, rebuild=rebuild)
    limit = root_limit_name(root, "judge")
    ensure_root_limit(limit)
    logger.info("waiting for %s (one judging job per root at a time)", limit)
    with concurrency(limit, occupy=1, strict=True):
        reports = [score_with_head(root, head, storage, meta) for head in heads or []]
        if semdedup:
            reports.append(group_duplicates(root, settings, storage, meta))
    _report(root, reports)
    return reports


def _report(root: str, reports: list[dict[str, Any]]) -> None:
    lines = [
        f"# Judgements of `{root}`",
        "",
        "| judgement | files judged | rows | files current | seconds | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in reports:
        if r["kind"] == "head":
            lines.append(
                f"| _scores/{r['head']} | {r['files_scored']} | {r['rows']:,} "
                f"| {r['files_current']} | {r['seconds']} | sha256 {r['sha256'][:12]} |"
            )
        else:
            lines.append(
                f"| _scores/{r['name']} | {r['files_new']} | {r['rows_new']:,} | "
                f"| {r['seconds']} | {r['duplicates_new']:,} duplicates of earlier rows, "
                f"{r['clusters']} clusters{' (trained)' if r['trained'] else ''} |"
            )
    create_markdown_artifact("\n".join(lines) + "\n", key=SCORE_KEY)
