"""``build_index_flow``: build or update the kNN indexes of a table root.

Started by hand (``prefect deployment run 'build-index/build-index' --param root=…``),
or by the deployment's trigger on ``clipbatch.run.completed``, which every embed run
emits when it completes having written something (:mod:`clipbatch_flows.reporting`).

One build per root at a time: the flow holds a slot of the global concurrency limit
``clipbatch-index-…`` of its root (limit 1, created on first use; flows/limits.py) for the whole build,
so a backfill's many completions queue one after another instead of racing on the
same ``_knn/`` pointer. The first queued run indexes everything its predecessors left;
the ones after it find the index current and finish in seconds.

A build that completes emits ``clipbatch.index.completed`` about its root (changed or
not, in the ``clipbatch.changed`` label): the curate deployment's trigger.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from clipbatch_flows.assets import asset_key
from clipbatch_flows.limits import ensure_root_limit, root_limit_name
from clipbatch_flows.run_meta import current_run_meta
from clipbatch_tasks.knn import build_knn_index
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.concurrency.sync import concurrency
from prefect.events import emit_event
from prefect.logging import get_run_logger
from pydantic import Field

from clipbatch.config import StorageOptions
from clipbatch.knn.policy import IndexSettings
from clipbatch.knn.store import index_uri

IndexName = Literal["image", "text"]
# Emitted when a build completes; the curate deployment's trigger reacts to it.
INDEX_COMPLETED = "clipbatch.index.completed"


@flow(name="build-index", validate_parameters=True, log_prints=False)
def build_index_flow(
    root: str,
    names: list[IndexName] | None = None,
    factory: str = "auto",
    nprobe: Annotated[int | None, Field(ge=1)] = None,
    rebuild: bool = False,
    storage: StorageOptions | None = None,
) -> list[dict[str, Any]]:
    """Build or update ``root/_knn/{image,text}`` from every table under ``root``.

    Args:
        root: The table, or the partition root of nightly ``date=…/`` tables.
        names: Which indexes: image, text (default both; text when rows have it).
        factory: FAISS index factory, or auto (Flat, IVF…,Flat or IVF…,SQ8 by size).
        nprobe: IVF lists searched per query (default nlist/16).
        rebuild: From scratch instead of an incremental update.
        storage: How to reach the store (endpoint, profile, credentials block).
    """
    logger = get_run_logger()
    storage = storage or StorageOptions()
    settings = IndexSettings(factory=factory, nprobe=nprobe, rebuild=rebuild)
    meta = current_run_meta()
    limit = root_limit_name(root)
    ensure_root_limit(limit)
    logger.info("waiting for %s (one index build per root at a time)", limit)
    # Held for the whole build; its lease is renewed while the build runs.
    with concurrency(limit, occupy=1, strict=True):
        logger.info("building the kNN indexes of %s", root)
        reports = [
            build_knn_index(root, name, settings, storage, meta, names is not None)
            for name in names or ["image", "text"]
        ]
    _report(root, reports)
    _announce(root, storage, reports)
    return reports


def _announce(root: str, storage: StorageOptions, reports: list[dict[str, Any]]) -> None:
    """``clipbatch.index.completed`` about the root: the curate deployment's trigger."""
    changed = any(r["mode"] in ("built", "updated") for r in reports)
    emit_event(
        event=INDEX_COMPLETED,
        resource={
            "prefect.resource.id": f"clipbatch.table.{root}",
            "prefect.resource.name": root.rstrip("/").rsplit("/", 1)[-1],
            "clipbatch.changed": "true" if changed else "false",
        },
        payload={
            "root": root,
            # Non-secret by construction (StorageOptions refuses secrets): the curate run
            # reaches the same store the same way.
            "storage": storage.model_dump(mode="json"),
            "indexes": {r["name"]: r["mode"] for r in reports},
        },
    )


def _report(root: str, reports: list[dict[str, Any]]) -> None:
    lines = [f"# kNN indexes of `{root}`", "", "| index | result | vectors | +added | -removed "
             "| files | factory | seconds |", "|---|---|---:|---:|---:|---:|---|---:|"]  # fmt: skip
    for r in reports:
        lines.append(
            f"| _knn/{r['name']} | {r['mode']} | {r['vectors']:,} | {r.get('added', 0):,} "
            f"| {r.get('removed', 0):,} | {r.get('files', 0)} | {r.get('factory', '')} "
            f"| {r.get('seconds', 0)} |"
        )
    create_markdown_artifact("\n".join(lines) + "\n", key="clipbatch-knn-index")
    changed = [r for r in reports if r["mode"] in ("built", "updated")]
    if not changed:
        return
    for r in changed:
        _materialize_index(root, r)


def _materialize_index(root: str, report: dict[str, Any]) -> None:
    """The index as an asset downstream of its table, with the build's figures."""
    index = Asset(
        key=asset_key(index_uri(root, report["name"])),
        properties=AssetProperties(
            name=f"_knn/{report['name']}", description="kNN index of a clipbatch table (FAISS)"
        ),
    )
    metadata = {k: report.get(k) for k in ("mode", "vectors", "added", "removed", "version")}

    @materialize(index, asset_deps=[Asset(key=asset_key(root))], name="materialize-knn-index")
    def record_index() -> None:
        add_asset_metadata(index, metadata)

    record_index()
