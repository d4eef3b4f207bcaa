"""The retry rule of every clipbatch task: transient errors only."""

from __future__ import annotations

from prefect import Task
from prefect.client.schemas.objects import TaskRun
from prefect.states import State

from clipbatch.errors import is_transient


def retry_on_transient(task: Task, task_run: TaskRun, state: State) -> bool:
    """Retry network faults, throttling and lost workers; never bad data or bad config."""
    try:
        state.result()
    except Exception as e:  # noqa: BLE001 - we classify, not handle
        return is_transient(e)
    return False
