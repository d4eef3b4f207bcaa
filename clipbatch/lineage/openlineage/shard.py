"""A shard task's own OpenLineage run, a child of its flow run."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    RunFacet,
    dataset_version_dataset,
    error_message_run,
    job_type_job,
    output_statistics_output_dataset,
    parent_run,
)

from clipbatch.config import EmbedConfig
from clipbatch.lineage.naming import dataset_id
from clipbatch.lineage.openlineage.client import Emitter
from clipbatch.lineage.openlineage.facets import (
    PRODUCER,
    SHARD_JOB_SUFFIX,
    column_lineage,
    flow_job_name,
    now,
    read_schema,
    run_uuid,
    schema_facet,
)
from clipbatch.lineage.redact import Redactor
from clipbatch.lineage.transport import namespace
from clipbatch.records import ShardResult, ShardSpec


class ShardLineage:
    """One shard task's OpenLineage run, a child of the flow run (called from the task)."""

    def __init__(
        self,
        shard: ShardSpec,
        config: EmbedConfig,
        run_meta: Mapping[str, Any],
        task_run_id: Any,
        output_uri: str,
        emitter: Emitter | None = None,
    ) -> None:
        self.shard = shard
        self.config = config
        self.meta = dict(run_meta)
        self.emitter = emitter or Emitter()
        self.redact = Redactor()
        self.namespace = namespace()
        self.flow_job = flow_job_name(self.meta)
        self.job_name = f"{self.flow_job}.{SHARD_JOB_SUFFIX}"
        self.run_id = run_uuid(task_run_id or uuid.uuid4())
        self.input = dataset_id(shard.uri)
        self.output = dataset_id(output_uri)

    def _event(
        self,
        state: RunState,
        run_facets: dict[str, RunFacet] | None = None,
        out_facets: dict[str, Any] | None = None,
        out_output_facets: dict[str, Any] | None = None,
    ) -> RunEvent:
        facets: dict[str, RunFacet] = {
            "parent": parent_run.ParentRunFacet(
                run=parent_run.Run(
                    runId=run_uuid(self.meta.get("flow_run_id") or self.meta.get("run_id"))
                ),
                job=parent_run.Job(namespace=self.namespace, name=self.flow_job),
            )
        }
        facets.update(run_facets or {})
        return RunEvent(
            eventType=state,
            eventTime=now(),
            run=Run(runId=self.run_id, facets=facets),
            job=Job(
                namespace=self.namespace,
                name=self.job_name,
                facets={
                    "jobType": job_type_job.JobTypeJobFacet(
                        processingType="BATCH", integration="PREFECT", jobType="TASK"
                    )
                },
            ),
            producer=PRODUCER,
            inputs=[
                InputDataset(
                    namespace=self.input[0],
                    name=self.input[1],
                    facets={
                        "version": dataset_version_dataset.DatasetVersionDatasetFacet(
                            datasetVersion=self.shard.version
                        )
                    },
                )
            ],
            outputs=[
                OutputDataset(
                    namespace=self.output[0],
                    name=self.output[1],
                    facets=out_facets or {},
                    outputFacets=out_output_facets or {},
                )
            ],
        )

    def start(self) -> None:
        if self.emitter.enabled:
            self.emitter.emit(self._event(RunState.START))

    def complete(self, result: ShardResult) -> None:
        if not self.emitter.enabled:
            return
        facets: dict[str, Any] = {
            "columnLineage": column_lineage(self.config.source, [self.input]),
        }
        schema = read_schema(result.output_uri, self.config.sink.storage)
        if schema is not None:
            facets["schema"] = schema_facet(schema)
        if result.sha256:
            facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(
                datasetVersion=f"sha256:{result.sha256}"
            )
        stats = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(
            rowCount=result.rows, fileCount=1
        )
        self.emitter.emit(self._event(RunState.COMPLETE, None, facets, {"outputStatistics": stats}))

    def fail(self, error: BaseException) -> None:
        if not self.emitter.enabled:
            return
        facet = error_message_run.ErrorMessageRunFacet(
            message=self.redact.text(f"{type(error).__name__}: {error}"),
            programmingLanguage="PYTHON",
        )
        self.emitter.emit(self._event(RunState.FAIL, {"errorMessage": facet}))
