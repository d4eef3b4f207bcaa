"""The backfill's ``max_concurrent_runs``: never more child runs in flight than that.

Real child flow runs on the session's Prefect test server: the backfill creates them
through ``run_deployment`` (a deployment with no work pool, so nothing picks them up),
and this test plays the worker, finishing one child at a time. The backfill talks to the
server through a counting proxy of ours, the test directly, so the proxy shows when the
backfill is polling its children, that is, waiting on a full window. Whenever the window
is full and the backfill has been seen polling its newest child, no further child may
exist; only finishing one lets the next start. No sleeps stand in for any of this.
"""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.timeout(180)

CHILDREN = 6
WINDOW = 2


def wait_for(condition: Any, what: str, timeout: float = 60.0) -> Any:
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_backfill_keeps_at_most_max_concurrent_runs_in_flight(prefect_harness: None) -> None:
    from clipbatch_flows.backfill import BackfillConfig, backfill
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Completed

    api = PREFECT_API_URL.value()
    direct = SyncPrefectClient(api)  # the test's own client: not through the proxy
    with SyncPrefectClient(api) as setup:
        flow_id = setup.create_flow_from_name("embed-dataset")
        name = f"throttle-{uuid.uuid4().hex[:8]}"
        deployment_id = setup.create_deployment(flow_id=flow_id, name=name)
    by_deployment = DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))

    proxy = FaultProxy(api.split("/api", 1)[0]).start()
    spec = BackfillConfig(
        source_template="s3://raw/{partition}/",
        dest_template="s3://emb/partition={partition}/",
        partitions=[f"p{i}" for i in range(CHILDREN)],
        max_concurrent_runs=WINDOW,
        deployment=f"embed-dataset/{name}",
        poll_seconds=0.5,
    )
    outcome: dict[str, Any] = {}

    # Only the backfill's REST calls go through the proxy. The process-wide events worker
    # (one per process, whatever the URL) is started here first, on the server's own
    # URL, so that this test leaves no worker bound to a proxy that is about to stop.
    EventsWorker.instance()

    def run_backfill() -> None:
        try:
            with temporary_settings({PREFECT_API_URL: f"{proxy.url}/api"}):
                try:
                    outcome["summary"] = backfill(spec)
                finally:
                    APILogWorker.drain_all()  # the run's logs, sent through the proxy now
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            outcome["error"] = e

    finished: set[str] = set()
    in_flight_seen: list[int] = []
    runner = threading.Thread(target=run_backfill, daemon=True)
    try:
        with direct:

            def children() -> list[Any]:
                return direct.read_flow_runs(
                    deployment_filter=by_deployment, sort=FlowRunSort.START_TIME_ASC
                )

            def polled(run_id: Any) -> bool:
                target = f"/api/flow_runs/{run_id}"
                return any(ex.method == "GET" and ex.target == target for ex in proxy.exchanges)

            runner.start()
            while len(finished) < CHILDREN:
                assert "error" not in outcome, outcome["error"]
                runs = sorted(children(), key=lambda r: r.created)
                running = [r for r in runs if str(r.id) not in finished]
                in_flight_seen.append(len(running))
                assert len(running) <= WINDOW, [r.name for r in running]
                if len(runs) < CHILDREN:
                    if len(running) < WINDOW:
                        time.sleep(0.05)  # polling: the backfill is filling its window
                        continue
                    # The window is full. Once the backfill polls its newest child, it is
                    # waiting for one to finish, and no further child can exist.
                    newest = runs[-1]
                    wait_for(lambda n=newest: polled(n.id), f"the backfill to poll {newest.name}")
                    now = children()
                    assert len(now) == len(runs), [r.name for r in now]
                # Play the worker: finish the oldest child still running.
                oldest = running[0]
                direct.set_flow_run_state(oldest.id, Completed(), force=True)
                finished.add(str(oldest.id))
            runner.join(timeout=60)
    finally:
        proxy.stop()
    assert not runner.is_alive()
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert summary["partitions"] == CHILDREN and summary["completed"] == CHILDREN
    assert summary["failed"] == []
    assert max(in_flight_seen) == WINDOW  # the window was used, and never exceeded
