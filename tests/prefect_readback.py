"""Read what a flow run left in Prefect (artifacts, events, logs) through the client."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter


def artifacts(flow_run_id: str) -> list[Any]:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def events(flow_run_id: str, prefixes: list[str], expect: int, timeout_s: float = 30.0) -> list:
    """Events whose name starts with one of ``prefixes`` and that relate to the flow run,
    once at least ``expect`` of them have arrived; raise, with what did arrive, if fewer
    have within ``timeout_s`` (a scan over them must never pass by scanning nothing).

    Events travel over a websocket and are persisted asynchronously: poll for them.
    """
    deadline = time.monotonic() + timeout_s
    found: list = []
    while True:
        with get_client(sync_client=True) as client:
            page = client.read_events(
                EventFilter(
                    event=EventNameFilter(prefix=prefixes),
                    related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"]),
                ),
                limit=50,
            )
        found = [
            e
            for e in page.events
            if any(r.id == f"prefect.flow-run.{flow_run_id}" for r in e.related)
        ]
        if len(found) >= expect:
            return found
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    raise AssertionError(
        f"{len(found)} of {expect} event(s) named {prefixes}* for flow run {flow_run_id} "
        f"within {timeout_s}s: {sorted(e.event for e in found)}"
    )


def event_names(found: list) -> dict[str, int]:
    """Event name -> how many, for asserting exactly which events a scan covered."""
    names: dict[str, int] = {}
    for e in found:
        names[e.event] = names.get(e.event, 0) + 1
    return names


def logs(flow_run_id: str, until: str, timeout_s: float = 30.0) -> list[str]:
    """The flow run's log messages, once one containing ``until`` has arrived.

    Logs reach the server in batches from a background worker, after the run returns:
    reading them at once can find none (the flake this replaces). Poll for the message
    the run logs last instead; raise if it never comes.
    """
    deadline = time.monotonic() + timeout_s
    messages: list[str] = []
    while time.monotonic() < deadline:
        with get_client(sync_client=True) as client:
            rows = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                limit=200,
            )
        messages = [r.message for r in rows]
        if any(until in m for m in messages):
            return messages
        time.sleep(0.2)
    raise AssertionError(f"no log containing {until!r} within {timeout_s}s: {messages[-5:]}")
