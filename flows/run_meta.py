"""The Prefect identifiers of the running flow, for lineage records."""

from __future__ import annotations

from typing import Any

from prefect.runtime import deployment, flow_run


def current_run_meta() -> dict[str, Any]:
    """Prefect identifiers for lineage: flow run, deployment, parent run."""
    return {
        "flow_run_id": flow_run.get_id(),
        "flow_run_name": flow_run.get_name(),
        "flow_name": flow_run.get_flow_name(),
        "deployment_id": deployment.get_id(),
        "deployment_name": deployment.get_name(),
        "parent_flow_run_id": flow_run.get_parent_flow_run_id(),
        "scheduled_start_time": str(flow_run.get_scheduled_start_time() or "") or None,
    }
