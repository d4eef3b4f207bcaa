"""OpenLineage run events for embedding runs and their shard tasks (design.md §6).

OSS Prefect has no OpenLineage integration, so a run reports itself: START when it
is planned, COMPLETE or FAIL at the end, with the source dataset as input and the
embedding table as output (schema, output statistics and column lineage facets).
Each shard task reports its own run, with a parent facet pointing at the flow run,
and the flow run points at its parent (a backfill) the same way.

The transport is the client's, configured the standard way: ``OPENLINEAGE_URL``
(+ ``OPENLINEAGE_API_KEY``), ``OPENLINEAGE_CONFIG`` or an ``openlineage.yml``
(console, file, HTTP, ...), or ``OPENLINEAGE__TRANSPORT__*`` variables. With none of
those, nothing is emitted (the client alone would fall back to printing to stdout).
Emission failures are logged and never fail a run.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import attr
import pyarrow as pa
from openlineage.client import OpenLineageClient
from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.facet_v2 import (
    RunFacet,
    column_lineage_dataset,
    dataset_version_dataset,
    error_message_run,
    job_type_job,
    nominal_time_run,
    output_statistics_output_dataset,
    parent_run,
    schema_dataset,
)

from clipbatch import __version__
from clipbatch.config import EmbedConfig, SourceConfig
from clipbatch.io.storage import get_fs, read_parquet_metadata
from clipbatch.lineage.naming import dataset_id, dataset_prefix
from clipbatch.lineage.redact import Redactor
from clipbatch.lineage.transport import namespace, transport_configured
from clipbatch.pipeline.process import process_context
from clipbatch.pipeline.summary import RunSummary
from clipbatch.plan.planner import RunPlan
from clipbatch.records import ShardResult, ShardSpec

log = logging.getLogger(__name__)

PRODUCER = "https://pypi.org/project/clipbatch/"
SHARD_JOB_SUFFIX = "encode-shard"
CUSTOM_FACET_SCHEMA = "https://pypi.org/project/clipbatch/#/definitions/ClipbatchRunFacet"


def flow_job_name(run_meta: Mapping[str, Any]) -> str:
    """Stable across runs: the deployment (flow/deployment) when deployed, else the flow."""
    flow = run_meta.get("flow_name") or "embed-dataset"
    deployment = run_meta.get("deployment_name")
    return f"{flow}/{deployment}" if deployment else str(flow)


def run_uuid(value: Any) -> str:
    """OpenLineage run ids are UUIDs; Prefect's are too, other ids are mapped stably."""
    text = str(value)
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"clipbatch:{text}"))


@attr.define
class ClipbatchRunFacet(RunFacet):
    """Prefect identifiers, model and code version: what a platform team asks first."""

    prefect: dict[str, Any] = attr.field(factory=dict)
    model: dict[str, Any] = attr.field(factory=dict)
    code: dict[str, Any] = attr.field(factory=dict)

    @staticmethod
    def _get_schema() -> str:
        return CUSTOM_FACET_SCHEMA


def source_fields(source: SourceConfig) -> dict[str, str]:
    """Names of the source's fields for column lineage, by role."""
    if source.kind == "table":
        return {
            "image": source.image_column,
            "caption": source.caption_column or "caption",
            "key": source.key_column or "__index__",
        }
    caption = (
        f"json.{source.caption_json_field}" if source.caption_json_field else source.caption_ext
    )
    return {"image": "image", "caption": caption, "key": "__key__"}


# output column -> (source roles it is computed from, transformation subtype, description)
_COLUMN_LINEAGE: dict[str, tuple[tuple[str, ...], str, str]] = {
    "key": (("key",), "IDENTITY", "the source key, or one derived from shard and member"),
    "source_member": (("key",), "IDENTITY", "member stem, relative path or row index"),
    "caption": (("caption",), "TRANSFORMATION", "NFC-normalised caption"),
    "image_sha256": (("image",), "TRANSFORMATION", "sha256 of the raw image bytes"),
    "width": (("image",), "TRANSFORMATION", "decoded image width"),
    "height": (("image",), "TRANSFORMATION", "decoded image height"),
    "image_embedding": (("image",), "TRANSFORMATION", "CLIP encode_image"),
    "text_embedding": (("caption",), "TRANSFORMATION", "CLIP encode_text"),
    "similarity": (("image", "caption"), "TRANSFORMATION", "cosine of the two embeddings"),
    "status": (("image", "caption"), "TRANSFORMATION", "decode and validation outcome"),
}


def column_lineage(source: SourceConfig, inputs: list[tuple[str, str]]) -> RunFacet:
    fields = source_fields(source)
    out: dict[str, column_lineage_dataset.Fields] = {}
    for column, (roles, subtype, description) in _COLUMN_LINEAGE.items():
        out[column] = column_lineage_dataset.Fields(
            inputFields=[
                column_lineage_dataset.InputField(
                    namespace=ns,
                    name=name,
                    field=fields[role],
                    transformations=[
                        column_lineage_dataset.Transformation(
                            type="DIRECT", subtype=subtype, description=description
                        )
                    ],
                )
                for ns, name in inputs
                for role in roles
            ]
        )
    return column_lineage_dataset.ColumnLineageDatasetFacet(fields=out)


def schema_facet(schema: pa.Schema) -> schema_dataset.SchemaDatasetFacet:
    return schema_dataset.SchemaDatasetFacet(
        fields=[
            schema_dataset.SchemaDatasetFacetFields(name=f.name, type=str(f.type)) for f in schema
        ]
    )


def read_schema(uri: str, storage: Any) -> pa.Schema | None:
    try:
        fs, path = get_fs(uri, storage)
        return read_parquet_metadata(fs, path).schema.to_arrow_schema().remove_metadata()
    except (OSError, pa.ArrowInvalid) as e:
        log.debug("no schema for %s: %s", uri, e)
        return None


def _iso(value: Any) -> str | None:
    if not value:
        return None
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat()


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _config_signature() -> tuple[Any, ...]:
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("OPENLINEAGE")))
    return (env, os.getcwd())


def shared_client() -> OpenLineageClient:
    """One client per transport configuration and process: shard tasks reuse it."""
    process = process_context()
    with process.lock:
        clients = process.lineage_clients
        signature = _config_signature()
        client = clients.get(signature)
        if client is None:
            client = OpenLineageClient()
            # The client aliases OPENLINEAGE_URL into more variables: key it both ways.
            clients[signature] = clients[_config_signature()] = client
        return client


class Emitter:
    """The OpenLineage client, or nothing when no transport is configured."""

    def __init__(self, client: OpenLineageClient | None = None) -> None:
        if client is None and transport_configured():
            try:
                client = shared_client()
            except Exception as e:  # a bad openlineage.yml must not stop embedding
                log.warning("OpenLineage disabled: cannot configure its transport: %s", e)
        self.client = client

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def emit(self, event: RunEvent) -> None:
        if self.client is None:
            return
        try:
            self.client.emit(event)
        except Exception as e:  # lineage must never fail the run it describes
            log.warning(
                "OpenLineage %s event for job %s not delivered: %s",
                event.eventType,
                event.job.name,
                e,
            )


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
        scheduled = _iso(self.meta.get("scheduled_start_time"))
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
