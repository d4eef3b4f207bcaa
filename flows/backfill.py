"""``embed-backfill``: one child ``embed-dataset`` run per partition (or slice), exactly once.

The OSS Prefect server has no backfill. This flow fans out one child flow run per
partition through ``run_deployment``, at most ``max_concurrent_runs`` at a time. With
``slices``, each partition (or one plain dataset) is cut into that many contiguous
blocks of shards, one child run each, all writing the same table: the Prefect-native
shape for a LAION-sized dataset on a pool of GPU workers. Every
child carries an idempotency key derived from its deployment, its parameters and
``attempt``: the server answers a repeated key with the run it already has, so
triggering the same backfill twice creates no second child run, and each child's
fingerprints keep the output free of duplicates. A table artifact lists every child
run and its final state.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import time
from typing import Any

from clipbatch_flows.partitions import (
    DATE_FIELDS,
    check_template,
    date_range,
    parse_date,
    partition_values,
    placeholders,
)
from prefect import flow
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import PrefectHTTPStatusError
from prefect.logging import get_run_logger
from prefect.runtime import flow_run
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clipbatch.config import EmbedConfig, ModelConfig, RuntimeConfig, StorageOptions
from clipbatch.errors import ClipbatchError, ConfigError
from clipbatch.window import completed

MAX_PARTITIONS = 1000
ARTIFACT_KEY = "embed-backfill"


class BackfillFailedError(ClipbatchError):
    """Some child runs did not complete; the artifact lists which."""


class BackfillConfig(BaseModel):
    """What to backfill: partitions (a list or a date range), URL templates, model, options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_template: str = Field(
        ...,
        min_length=1,
        description="Source URL with a {date} or {partition} placeholder, e.g. s3://raw/{date}/",
    )
    dest_template: str = Field(
        ...,
        min_length=1,
        description="Destination URL with the same placeholder, e.g. s3://emb/date={date}/",
    )
    partitions: list[str] = Field(
        default_factory=list,
        max_length=MAX_PARTITIONS,
        description="Explicit partitions. Leave empty to use start_date..end_date instead.",
    )
    start_date: dt.date | None = Field(None, description="First date of the range (YYYY-MM-DD).")
    end_date: dt.date | None = Field(
        None, description="Last date of the range, included (YYYY-MM-DD)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The CLIP model.")
    runtime: RuntimeConfig = Field(
        default_factory=RuntimeConfig, description="Device, batch size and retries per child."
    )
    storage: StorageOptions = Field(
        default_factory=StorageOptions, description="Object-store options for source and dest."
    )
    overwrite: bool = Field(False, description="Redo shards even when their output is current.")
    max_concurrent_runs: int = Field(
        2, ge=1, le=64, description="Child flow runs in flight at once (GPU slots)."
    )
    deployment: str = Field(
        "embed-dataset/embed-adhoc",
        pattern=r"^[^/]+/[^/]+$",
        description="The child deployment, as flow-name/deployment-name.",
    )
    attempt: int = Field(
        1,
        ge=1,
        le=1000,
        description="Part of each child's idempotency key: the same value reuses earlier child "
        "runs; bump it to run the partitions again (e.g. after failures).",
    )
    poll_seconds: float = Field(
        10.0, ge=0.5, le=600.0, description="How often child run states are polled."
    )
    slices: int = Field(
        1,
        ge=1,
        le=4096,
        description="Split each partition's shards into this many contiguous slices, one "
        "child run each (e.g. 32 GPU pods on a LAION-sized dataset). Without partitions, "
        "the templates are plain URLs and every child writes the same table.",
    )

    @model_validator(mode="after")
    def _check(self) -> BackfillConfig:
        has_range = self.start_date is not None or self.end_date is not None
        if self.partitions and has_range:
            raise ValueError("give either partitions or start_date/end_date, not both")
        if not self.partitions and not has_range and self.slices == 1:
            raise ValueError("give partitions, or start_date and end_date, or slices > 1")
        if has_range:
            if self.start_date is None or self.end_date is None:
                raise ValueError("a date range needs both start_date and end_date")
            if self.end_date < self.start_date:
                raise ValueError(f"end_date {self.end_date} is before start_date {self.start_date}")
            if (self.end_date - self.start_date).days >= MAX_PARTITIONS:
                raise ValueError(f"a date range may cover at most {MAX_PARTITIONS} days")
        if len(set(self.partitions)) != len(self.partitions):
            raise ValueError("partitions lists a value more than once")
        for partition in self.partitions:
            try:
                partition_values(partition)
            except ConfigError as e:
                raise ValueError(str(e)) from e
        not_dates = [p for p in self.partitions if parse_date(p) is None]
        if not_dates and self.uses_date_fields():
            raise ValueError(
                f"partitions {not_dates[:3]} are not dates (YYYY-MM-DD), so the templates "
                "must use {partition}, not {date}/{year}/{month}/{day}"
            )
        partitioned = bool(self.partitions) or has_range
        for name, template in (("source", self.source_template), ("dest", self.dest_template)):
            try:
                check_template(template)
            except ConfigError as e:
                raise ValueError(str(e)) from e
            if partitioned and not placeholders(template):
                # Every child would read (source) or write (dest) the same place.
                raise ValueError(f"{name}_template needs a {{date}} or {{partition}} placeholder")
            if not partitioned and placeholders(template):
                raise ValueError(
                    f"{name}_template has a placeholder but no partitions are given; "
                    "give partitions, or plain URLs to slice one dataset"
                )
        return self

    def partition_list(self) -> list[str]:
        if self.partitions:
            return list(self.partitions)
        if self.start_date is None or self.end_date is None:
            return []  # slices of one dataset
        return date_range(self.start_date, self.end_date)

    def children(self) -> list[tuple[str | None, str | None]]:
        """(partition, shard slice) of every child run, in order."""
        partitions: list[str | None] = list(self.partition_list()) or [None]
        slices: list[str | None] = (
            [f"{i}/{self.slices}" for i in range(self.slices)] if self.slices > 1 else [None]
        )
        return [(p, s) for p in partitions for s in slices]

    def uses_date_fields(self) -> bool:
        used = placeholders(self.source_template) | placeholders(self.dest_template)
        return bool(used & set(DATE_FIELDS))

    def child_config(self) -> EmbedConfig:
        """The child's ``config``: URL templates that the child fills from ``partition``."""
        return EmbedConfig(
            source={"url": self.source_template, "storage": self.storage},
            sink={"url": self.dest_template, "overwrite": self.overwrite, "storage": self.storage},
            model=self.model,
            runtime=self.runtime,
        )


def child_parameters(
    spec: BackfillConfig, partition: str | None, shard_slice: str | None = None
) -> dict[str, Any]:
    # Only what differs from the defaults: the child validates against its deployment's
    # schema, which may be a release older or newer than this flow's code.
    config = spec.child_config().model_dump(mode="json", exclude_defaults=True)
    params: dict[str, Any] = {"config": config}
    if partition is not None:
        params["partition"] = partition
    if shard_slice is not None:
        params["shard_slice"] = shard_slice
    return params


def child_label(partition: str | None, shard_slice: str | None) -> str:
    """How a child run is named and listed: the partition, the slice, or both."""
    slice_part = f"slice-{shard_slice.replace('/', '-of-')}" if shard_slice else ""
    return "-".join(p for p in (partition, slice_part) if p) or "all"


def idempotency_key(spec: BackfillConfig, parameters: dict[str, Any]) -> str:
    """Same deployment, parameters and attempt: same key, so the server reuses the run."""
    payload = json.dumps(
        {"deployment": spec.deployment, "parameters": parameters, "attempt": spec.attempt},
        sort_keys=True,
        separators=(",", ":"),
    )
    return "clipbatch-backfill-" + hashlib.sha256(payload.encode()).hexdigest()[:40]


@flow(name="embed-backfill", validate_parameters=True, log_prints=False)
def backfill(spec: BackfillConfig) -> dict[str, Any]:
    """Run the child deployment once per partition and wait for every child run.

    Args:
        spec: Partitions, URL templates, model and options of the backfill.
    """
    logger = get_run_logger()
    children = spec.children()
    labels = [child_label(p, sl) for p, sl in children]
    started = _own_created_time()
    rows: dict[str, dict[str, Any]] = {}
    run_ids: dict[str, str] = {}  # label -> child flow run id, while it runs
    logger.info(
        "backfill of %d child run(s) through %s, %d at a time",
        len(children),
        spec.deployment,
        spec.max_concurrent_runs,
    )

    def start(unit: tuple[str, tuple[str | None, str | None]]) -> str:
        label, (partition, shard_slice) = unit
        params = child_parameters(spec, partition, shard_slice)
        try:
            child = run_deployment(
                spec.deployment,
                parameters=params,
                idempotency_key=idempotency_key(spec, params),
                flow_run_name=f"backfill-{label}",
                tags=["backfill"],
                timeout=0,  # polled below, so the window stays full
            )
        except PrefectHTTPStatusError as e:
            # The child deployment refused the parameters (its schema differs): record
            # why, and go on with the other children.
            detail = e.response.text if e.response is not None else str(e)
            logger.error("%s: child run refused: %s", label, detail)
            rows[label] = {
                **_unit(partition, shard_slice),
                "flow_run_id": "",
                "flow_run_name": "",
                "state": f"Refused: {detail[:300]}",
                "reused": False,
            }
            return label
        reused = started is not None and child.created is not None and child.created < started
        rows[label] = _row(partition, shard_slice, child, reused)
        if not _final(child):
            run_ids[label] = str(child.id)
        return label

    def first_done(pending: list[str]) -> str:
        """Poll the running children every poll_seconds until one of them is final."""
        with get_client(sync_client=True) as client:
            while True:
                for label in pending:
                    if label not in run_ids:
                        return label
                time.sleep(spec.poll_seconds)
                for label in pending:
                    child = client.read_flow_run(run_ids[label])
                    row = rows[label]
                    rows[label] = _row(
                        row["partition"] or None, row["slice"] or None, child, row["reused"]
                    )
                    if _final(child):
                        run_ids.pop(label)
                        logger.info("%s: %s", label, child.state.name)

    units = list(zip(labels, children, strict=True))
    for _ in completed(units, start, spec.max_concurrent_runs, first_done):
        pass  # every child's row is up to date once it is handed back
    table = [rows[label] for label in labels]
    failed = [label for label, r in zip(labels, table, strict=True) if r["state"] != "Completed"]
    reused = sum(r["reused"] for r in table)
    create_table_artifact(
        table=table,
        key=ARTIFACT_KEY,
        description=f"Backfill via {spec.deployment}: {len(table)} child run(s), "
        f"{len(table) - len(failed)} completed, {reused} reused from an earlier trigger.",
    )
    summary = {
        "partitions": len(table),
        "completed": len(table) - len(failed),
        "failed": failed,
        "reused": reused,
        "child_runs": {label: r["flow_run_id"] for label, r in zip(labels, table, strict=True)},
    }
    if failed:
        raise BackfillFailedError(
            f"{len(failed)} of {len(table)} child run(s) did not complete: {', '.join(failed)}; "
            "rerun with attempt bumped to retry them (completed shards are skipped)"
        )
    return summary


def _final(child: Any) -> bool:
    return child.state is not None and child.state.is_final()


def _unit(partition: str | None, shard_slice: str | None) -> dict[str, str]:
    return {"partition": partition or "", "slice": shard_slice or ""}


def _row(
    partition: str | None, shard_slice: str | None, child: Any, reused: bool
) -> dict[str, Any]:
    return {
        **_unit(partition, shard_slice),
        "flow_run_id": str(child.id),
        "flow_run_name": child.name,
        "state": child.state.name if child.state is not None else "Unknown",
        "reused": reused,
    }


def _own_created_time() -> dt.datetime | None:
    """When this backfill run was created, by the server's clock; a child created earlier
    belongs to an earlier trigger."""
    run_id = flow_run.get_id()
    if not run_id:
        return None
    with get_client(sync_client=True) as client:
        return client.read_flow_run(run_id).created
