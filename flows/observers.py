"""Which observers a flow run gets: the run record, OpenLineage, and Prefect reporting."""

from __future__ import annotations

import logging
from typing import Any

from clipbatch_flows.reporting import PrefectReporter

from clipbatch.config import EmbedConfig
from clipbatch.lineage.observe import Observers, RunObserver
from clipbatch.lineage.record import RunRecordWriter
from clipbatch.lineage.redact import Redactor
from clipbatch.lineage.transport import transport_configured

log = logging.getLogger(__name__)


def trigger_meta(flow_run_id: str | None) -> dict[str, Any]:
    """How the run was started (schedule, deployment run, parent flow), from the API."""
    if not flow_run_id:
        return {}
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run_id)
            meta: dict[str, Any] = {
                "auto_scheduled": bool(run.auto_scheduled),
                "idempotency_key": run.idempotency_key,
                "created_by": run.created_by.display_value if run.created_by else None,
                "tags": list(run.tags or []),
            }
            if run.parent_task_run_id:
                parent_task = client.read_task_run(run.parent_task_run_id)
                if parent_task.flow_run_id:
                    parent = client.read_flow_run(parent_task.flow_run_id)
                    name = client.read_flow(parent.flow_id).name
                    if parent.deployment_id:  # same job naming as flow_job_name()
                        name = f"{name}/{client.read_deployment(parent.deployment_id).name}"
                    meta["parent_job_name"] = name
            return meta
    except Exception as e:  # lineage detail, never a reason to fail the run
        log.warning("could not read flow run %s for lineage: %s", flow_run_id, e)
        return {}


def make_observers(config: EmbedConfig, run_meta: dict[str, Any]) -> Observers:
    meta = {**run_meta, **trigger_meta(run_meta.get("flow_run_id"))}
    redactor = Redactor()
    observers: list[RunObserver] = [RunRecordWriter(config, meta, redactor)]
    if transport_configured():  # imported only then: the client alone costs 0.3 s
        from clipbatch.lineage.openlineage.observer import OpenLineageObserver

        observers.append(OpenLineageObserver(config, meta, redactor=redactor))
    observers.append(PrefectReporter(config, meta, redactor))
    return Observers(observers)
