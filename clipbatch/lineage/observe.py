"""Run observers: how lineage, events and artifacts hear about a run, without the
flow knowing each of them. The flow calls every observer at three points; an
observer that fails logs and never fails the run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

from clipbatch.pipeline.summary import RunSummary
from clipbatch.plan.planner import RunPlan
from clipbatch.records import ShardResult

log = logging.getLogger(__name__)


class RunObserver(Protocol):
    def run_started(self, plan: RunPlan) -> None: ...

    def shard_finished(self, result: ShardResult) -> None: ...

    def run_finished(self, summary: RunSummary, error: BaseException | None) -> None: ...


class Observers:
    """Fans calls out to several observers, isolating their failures."""

    def __init__(self, observers: Sequence[RunObserver]) -> None:
        self.observers = list(observers)

    def _call(self, method: str, *args: object) -> None:
        for obs in self.observers:
            try:
                getattr(obs, method)(*args)
            except Exception:  # an observer must never fail the run it observes
                log.exception("observer %s.%s failed", type(obs).__name__, method)

    def run_started(self, plan: RunPlan) -> None:
        self._call("run_started", plan)

    def shard_finished(self, result: ShardResult) -> None:
        self._call("shard_finished", result)

    def run_finished(self, summary: RunSummary, error: BaseException | None) -> None:
        self._call("run_finished", summary, error)
