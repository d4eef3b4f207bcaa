"""``curate``: a training set from a root's judgements, every night.

The spec (:class:`clipbatch.curate.spec.CurationSpec`) is the flow's parameter, so the
Prefect UI shows it as a form. Started by hand::

    prefect deployment run 'curate/curate' --param root=s3://bucket/emb

or by the deployment's trigger on ``clipbatch.index.completed``, which the build-index
flow emits after it built or updated a root's indexes (itself started after each embed
run): embed -> index -> curate, night after night. One judging job per root at a time:
the flow holds the root's ``clipbatch-judge-…`` limit, as the score flow does.
"""

from __future__ import annotations

from typing import Any

from clipbatch_flows.assets import asset_key
from clipbatch_flows.limits import ensure_root_limit, root_limit_name
from clipbatch_flows.run_meta import current_run_meta
from clipbatch_tasks.curate import curate_selection
from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.concurrency.sync import concurrency
from prefect.logging import get_run_logger

from clipbatch.config import StorageOptions
from clipbatch.curate.spec import CurationSpec

CURATE_KEY = "clipbatch-curation"


@flow(name="curate", validate_parameters=True, log_prints=False)
def curate_flow(
    root: str, spec: CurationSpec, storage: StorageOptions | None = None
) -> dict[str, Any]:
    """Decide every new row of ``root`` by ``spec``; ship the kept rows as new shards.

    Args:
        root: The table, or the partition root of nightly ``date=…/`` tables.
        spec: The curation spec: its name, rules, the heads to compute, the output.
        storage: How to reach the table root (the output has its own, in the spec).
    """
    logger = get_run_logger()
    storage = storage or StorageOptions()
    meta = current_run_meta()
    limit = root_limit_name(root, "judge")
    ensure_root_limit(limit)
    logger.info("waiting for %s (one judging job per root at a time)", limit)
    with concurrency(limit, occupy=1, strict=True):
        report = curate_selection(root, spec, storage, meta)
    _report(root, spec, report)
    return report


def _report(root: str, spec: CurationSpec, r: dict[str, Any]) -> None:
    rows = r["kept"] + r["dropped"]
    lines = [
        f"# Selection `{spec.name}` of `{root}`",
        "",
        f"{r['files_decided']} file(s) decided ({r['rows_decided']:,} rows), "
        f"{r['files_current']} already current, {len(r['files_waiting'])} waiting for "
        "their judgements.",
        "",
        "| rows | count | share |",
        "|---|---:|---:|",
        f"| kept | {r['kept']:,} | {_share(r['kept'], rows)} |",
        f"| dropped | {r['dropped']:,} | {_share(r['dropped'], rows)} |",
    ]
    for kind, count in r["reasons"].items():
        lines.append(f"| dropped for {kind} | {count:,} | {_share(count, rows)} |")
    shards = r["shards"]
    lines += [
        "",
        f"Published {len(shards)} shard(s) to `{spec.output.url}`"
        + (f": {shards[0]} to {shards[-1]}" if shards else "")
        + f", {r['image_bytes'] / 1e6:.1f} MB of images. Rows can be dropped for several "
        "reasons; each counts once per reason.",
    ]
    create_markdown_artifact("\n".join(lines) + "\n", key=CURATE_KEY)
    if shards:
        _materialize(root, spec, r)


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else "-"


def _materialize(root: str, spec: CurationSpec, report: dict[str, Any]) -> None:
    """The curated shards as an asset downstream of the table root."""
    output = Asset(
        key=asset_key(spec.output.url),
        properties=AssetProperties(
            name=f"curated/{spec.name}", description="Curated WebDataset shards (clipbatch)"
        ),
    )
    metadata = {k: report.get(k) for k in ("kept", "dropped", "shards", "image_bytes")}

    @materialize(output, asset_deps=[Asset(key=asset_key(root))], name="materialize-curated")
    def record() -> None:
        add_asset_metadata(output, {**metadata, "spec": spec.identity()[:12]})

    record()
