"""What a run shows in the Prefect UI: events, asset materialisations and artifacts.

- ``clipbatch.shard.committed`` / ``clipbatch.shard.failed`` events, one per shard,
  with the counts and source version in the payload (automations can react to them);
- ``clipbatch.run.completed`` when a run completes, about its table root (the
  build-index deployment's trigger);
- a progress artifact that advances as shards finish (at most one update per 2 s);
- at the end, a markdown summary artifact (a table of shards, rows ok and failed,
  images/s, the destination) and an asset materialisation of the table, with its
  source as upstream asset and row counts and model as metadata.

Everything here runs inside the flow run and is redacted like the run record.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from clipbatch_flows.assets import asset_key
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.assets import Asset, AssetProperties, add_asset_metadata, materialize
from prefect.events import emit_event
from prefect.logging import get_run_logger

from clipbatch.config import EmbedConfig
from clipbatch.lineage.naming import dataset_prefix
from clipbatch.lineage.redact import Redactor
from clipbatch.pipeline.summary import RunSummary
from clipbatch.records import ShardResult

if TYPE_CHECKING:
    from clipbatch.plan.planner import RunPlan

log = logging.getLogger(__name__)

SHARD_COMMITTED = "clipbatch.shard.committed"
SHARD_FAILED = "clipbatch.shard.failed"
# Emitted when a run completes; the build-index deployment's trigger reacts to it.
RUN_COMPLETED = "clipbatch.run.completed"
SUMMARY_KEY = "clipbatch-run-summary"
INDEX_TRIGGER_KEY = "clipbatch-index-trigger"
PROGRESS_KEY = "clipbatch-run-progress"
MAX_TABLE_ROWS = 200  # the markdown table lists at most this many shards
PROGRESS_INTERVAL_S = 2.0


class PrefectReporter:
    """A :class:`clipbatch.lineage.observe.RunObserver` reporting to the Prefect API."""

    def __init__(
        self,
        config: EmbedConfig,
        run_meta: dict[str, Any],
        redactor: Redactor | None = None,
        progress_interval_s: float = PROGRESS_INTERVAL_S,
    ) -> None:
        self.config = config
        self.meta = run_meta
        self.redact = redactor or Redactor()
        self.dest = self.redact.text(config.sink.url)
        self.total = 0
        self.done = 0
        self.progress_id: Any = None
        self._last_progress = 0.0
        self.progress_interval_s = progress_interval_s
        self.model: dict[str, str] = {}

    def run_started(self, plan: RunPlan) -> None:
        self.total = len(plan.shards)
        self.model = {
            "model": plan.checkpoint.display_name,
            "checkpoint_sha256": plan.checkpoint.sha256,
        }
        self.progress_id = create_progress_artifact(
            progress=0.0 if self.total else 100.0,
            key=PROGRESS_KEY,
            description=f"0 of {self.total} shard(s) done -> {self.dest}",
        )

    def shard_finished(self, result: ShardResult) -> None:
        self.done += 1
        now = time.monotonic()
        # Throttled: one update per progress_interval_s, so the API calls a run makes for
        # its progress do not grow with its shards (the last one is in run_finished).
        if now - self._last_progress >= self.progress_interval_s:
            self._update_progress()
            self._last_progress = now
        if result.status == "skipped":
            return
        event = SHARD_COMMITTED if result.status == "committed" else SHARD_FAILED
        emit_event(
            event=event,
            resource={
                "prefect.resource.id": f"clipbatch.shard.{self.redact.text(result.source_uri)}",
                "prefect.resource.name": result.shard,
                "clipbatch.dest": self.dest,
            },
            payload=self.redact(
                {
                    "shard": result.shard,
                    "output_uri": result.output_uri,
                    "rows": result.rows,
                    "counts": result.counts,
                    "source_uri": result.source_uri,
                    "source_version": result.source_version,
                    "sha256": result.sha256,
                    "fingerprint": result.fingerprint,
                    "seconds": round(result.seconds, 3),
                    "error": result.error,
                    **self.model,
                }
            ),
        )

    def _update_progress(self) -> None:
        if self.progress_id is not None and self.total:
            update_progress_artifact(
                self.progress_id,
                progress=100.0 * self.done / self.total,
                description=f"{self.done} of {self.total} shard(s) done -> {self.dest}",
            )

    def run_finished(self, summary: RunSummary, error: BaseException | None) -> None:
        self._update_progress()
        create_markdown_artifact(
            markdown=self.redact.text(summary_markdown(summary, self.model, error)),
            key=SUMMARY_KEY,
            description=f"clipbatch run summary for {self.dest}",
        )
        if summary.committed:
            self._materialize(summary)
        if error is None:
            self._emit_completed(summary)

    def _emit_completed(self, summary: RunSummary) -> None:
        """``clipbatch.run.completed`` about the table root (a partition's parent), with
        ``clipbatch.changed`` saying whether the run wrote anything: the build-index
        trigger matches changed tables only."""
        from clipbatch.tables.snapshot import partition_root

        root = self.redact.text(partition_root(self.config.sink.url))
        storage = self.redact(self.config.sink.storage.model_dump(mode="json"))
        self._check_index_trigger(root, storage)
        emit_event(
            event=RUN_COMPLETED,
            resource={
                "prefect.resource.id": f"clipbatch.table.{root}",
                "prefect.resource.name": root.rsplit("/", 1)[-1],
                "clipbatch.changed": "true" if summary.committed else "false",
            },
            payload=self.redact(
                {
                    "root": root,
                    "dest": self.dest,
                    # Non-secret by construction (StorageOptions refuses secrets), so the
                    # index run reaches the same store the same way.
                    "storage": storage,
                    "run_id": summary.run_id,
                    "shards_committed": summary.committed,
                    "rows_written": summary.rows_written,
                    **self.model,
                }
            ),
        )

    def _check_index_trigger(self, root: str, storage: dict[str, Any]) -> None:
        """The build-index trigger hands ``root`` and ``storage`` to the build-index flow.
        Parameters it would refuse make the automation's action fail, which only an event
        records: say so here, in this run's log and an artifact, where an operator looks."""
        from clipbatch_flows.knn import build_index_flow

        try:
            build_index_flow.validate_parameters({"root": root, "storage": storage})
        except Exception as e:  # noqa: BLE001 - Prefect's ParameterTypeError and kin
            message = (
                f"the build-index trigger cannot start an index build for {root}: its "
                f"parameters do not validate ({e}); build the index by hand with "
                "`clipbatch index` or `prefect deployment run 'build-index/build-index'`"
            )
            get_run_logger().error("%s", message)
            create_markdown_artifact(
                markdown=f"**Index build not triggered.** {message}",
                key=INDEX_TRIGGER_KEY,
                description=f"clipbatch: index trigger for {root}",
            )

    def _materialize(self, summary: RunSummary) -> None:
        table = Asset(
            key=asset_key(self.dest),
            properties=AssetProperties(
                name=self.dest.rstrip("/").rsplit("/", 1)[-1],
                description="CLIP embedding table (clipbatch)",
            ),
        )
        source = Asset(key=asset_key(self.redact.text(dataset_prefix(self.config.source.url))))
        metadata = {
            "rows_written": summary.rows_written,
            "rows_ok": summary.rows_ok,
            "rows_failed": summary.rows_written - summary.rows_ok,
            "shards_committed": summary.committed,
            "shards_skipped": summary.skipped,
            "shards_failed": summary.failures,
            "run_id": summary.run_id,
            **self.model,
        }

        @materialize(table, asset_deps=[source], name="materialize-embedding-table")
        def record_table() -> None:
            add_asset_metadata(table, metadata)

        record_table()


def summary_markdown(
    summary: RunSummary, model: dict[str, str], error: BaseException | None
) -> str:
    state = "completed" if error is None else f"failed: {type(error).__name__}"
    lines = [
        f"# clipbatch run `{summary.run_id}`: {state}",
        "",
        f"**Destination:** [{summary.dest}]({summary.dest})  ",
        f"**Model:** {model.get('model', '?')} (sha256 `{model.get('checkpoint_sha256', '?')}`)  ",
        f"**Shards:** {summary.shards} ({summary.committed} written, "
        f"{summary.skipped} already done, {summary.failures} failed)  ",
        f"**Rows written:** {summary.rows_written} ({summary.rows_ok} ok, "
        f"{summary.rows_written - summary.rows_ok} failed)  ",
        f"**Speed:** {summary.images_per_second():.1f} images/s over {summary.seconds:.1f} s",
        "",
        "| shard | status | rows | ok | failed | images/s | output | error |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in summary.results[:MAX_TABLE_ROWS]:
        rate = f"{r.rows / r.seconds:.1f}" if r.status == "committed" and r.seconds else "-"
        err = (r.error or "").replace("|", "\\|").replace("\n", " ")[:200]
        lines.append(
            f"| {r.shard} | {r.status} | {r.rows} | {r.ok_rows} | {r.failed_rows} | {rate} "
            f"| {r.output_uri or '-'} | {err} |"
        )
    if summary.shards > MAX_TABLE_ROWS:
        lines.append(f"| … {summary.shards - MAX_TABLE_ROWS} more | | | | | | | |")
    return "\n".join(lines) + "\n"
