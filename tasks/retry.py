"""The retry rule of every clipbatch task: transient errors only."""

from __future__ import annotations

from typing import Any

from prefect import Task
from prefect.cache_policies import NO_CACHE
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


# The options of a task that works on a whole root (an index build, scoring, curation):
# two retries of a transient failure, 5 s then 30 s apart (jittered), never cached
# (each run reads what the root holds now).
ROOT_JOB_OPTIONS: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_on_transient,
    "cache_policy": NO_CACHE,
    "log_prints": False,
}
