"""The flow run's OpenLineage events: START when planned, COMPLETE or FAIL at the end."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    RunFacet,
    error_message_run,
    job_type_job,
    nominal_time_run,
    output_statistics_output_dataset,
    parent_run,
)

from clipbatch import __version__
from clipbatch.config import EmbedConfig
from clipbatch.lineage.naming import dataset_id, dataset_prefix
from clipbatch.lineage.openlineage.client import Emitter
from clipbatch.lineage.openlineage.facets import (
    PRODUCER,
    ClipbatchRunFacet,
    column_lineage,
    flow_job_name,
    iso_time,
    now,
    read_schema,
    run_uuid,
    schema_facet,
)
from clipbatch.lineage.redact import Redactor
from clipbatch.lineage.transport import namespace
from clipbatch.pipeline.summary import RunSummary
from clipbatch.plan.planner import RunPlan
from clipbatch.records import ShardResult


class OpenLineageObserver:
    """A :class:`clipbatch.lineage.observe.RunObserver` emitting the flow run's events."""

    def __init__(
        self,
        config: EmbedConfig,
        run_meta: Mapping[str, Any],
        emitter: Emitter | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self.config = config
        self.meta = dict(run_meta)
        self.emitter = emitter or Emitter()
        self.redact = redactor or Redactor()
        self.namespace = namespace()
        self.job_name = flow_job_name(self.meta)
        self.run_id = run_uuid(self.meta.get("flow_run_id") or self.meta.get("run_id"))
        self.source = dataset_id(dataset_prefix(config.source.url))
        self.dest = dataset_id(config.sink.url)
        self.model: dict[str, Any] = {}

    def _run(self, extra: dict[str, RunFacet] | None = None) -> Run:
        facets: dict[str, RunFacet] = {
            "clipbatch": ClipbatchRunFacet(
                prefect=self.redact({k: v for k, v in self.meta.items() if v is not None}),
                model=self.model,
                code={"package": "clipbatch", "version": __version__},
            )
        }
        scheduled = iso_time(self.meta.get("scheduled_start_time"))
        if scheduled:
            facets["nominalTime"] = nominal_time_run.NominalTimeRunFacet(nominalStartTime=scheduled)
        parent_id = self.meta.get("parent_flow_run_id")
        if parent_id:
            facets["parent"] = parent_run.ParentRunFacet(
                run=parent_run.Run(runId=run_uuid(parent_id)),
                job=parent_run.Job(
                    namespace=self.namespace,
                    name=str(self.meta.get("parent_job_name") or "prefect-flow"),
                ),
            )
        facets.update(extra or {})
        return Run(runId=self.run_id, facets=facets)

    def _job(self) -> Job:
        return Job(
            namespace=self.namespace,
            name=self.job_name,
            facets={
                "jobType": job_type_job.JobTypeJobFacet(
                    processingType="BATCH", integration="PREFECT", jobType="FLOW"
                )
            },
        )

    def _event(
        self,
        state: RunState,
        outputs_facets: dict[str, Any] | None = None,
        output_facets: dict[str, Any] | None = None,
        run_facets: dict[str, RunFacet] | None = None,
    ) -> RunEvent:
        return RunEvent(
            eventType=state,
            eventTime=now(),
            run=self._run(run_facets),
            job=self._job(),
            producer=PRODUCER,
            inputs=[InputDataset(namespace=self.source[0], name=self.source[1])],
            outputs=[
                OutputDataset(
                    namespace=self.dest[0],
                    name=self.dest[1],
                    facets=outputs_facets or {},
                    outputFacets=output_facets or {},
                )
            ],
        )

    # -- observer hooks ---------------------------------------------------------
    def run_started(self, plan: RunPlan) -> None:
        self.model = {
            **plan.checkpoint.identity(),
            "name": plan.checkpoint.display_name,
            "checkpoint_sha256": plan.checkpoint.sha256,
        }
        self.emitter.emit(self._event(RunState.START))

    def shard_finished(self, result: ShardResult) -> None:
        return None  # shard tasks emit their own runs (see ShardLineage)

    def run_finished(self, summary: RunSummary, error: BaseException | None) -> None:
        done = summary.first_done()
        facets: dict[str, Any] = {
            "columnLineage": column_lineage(self.config.source, [self.source])
        }
        schema = read_schema(done.output_uri, self.config.sink.storage) if done else None
        if schema is not None:
            facets["schema"] = schema_facet(schema)
        stats = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
            rowCount=summary.rows_written, fileCount=summary.committed
        )
        run_facets: dict[str, RunFacet] = {}
        if error is not None:
            run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
                message=self.redact.text(f"{type(error).__name__}: {error}"),
                programmingLanguage="PYTHON",
            )
        state = RunState.COMPLETE if error is None else RunState.FAIL
        self.emitter.emit(self._event(state, facets, {"outputStatistics": stats}, run_facets))
