"""The one piece of process-wide state: what a process reuses across shards and runs.

A process (the CLI, a flow run, a Dask or Ray worker, a per-device worker) loads each
model once and keeps one :class:`~clipbatch.pipeline.worker.Worker` per setup; device
pools, OpenLineage clients and the progress hook live here too. Nothing else in the
library keeps module-level state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ProcessContext:
    models: dict[tuple[Any, ...], Any] = field(default_factory=dict)  # loaded, by identity
    model_loads: int = 0  # models actually loaded (tests assert once per worker)
    workers: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    device_pools: dict[tuple[str, ...], Any] = field(default_factory=dict)
    lineage_clients: dict[tuple[Any, ...], Any] = field(default_factory=dict)
    progress: Callable[[int], None] | None = None  # rows written (the CLI's progress bar)
    lock: threading.RLock = field(default_factory=threading.RLock)


_PROCESS = ProcessContext()


def process_context() -> ProcessContext:
    return _PROCESS
