"""Jobs for the device-pool tests; a light module, since each spawned worker imports it."""

from __future__ import annotations

import os
import time


def report(device: str, job: int) -> tuple[str, int, str, int]:
    """Which device the worker was told, its pid, and what its environment says."""
    time.sleep(0.05)  # long enough that concurrent jobs spread over the workers
    return device, os.getpid(), os.environ["CLIPBATCH_WORKER_DEVICE"], job


def die_on(device: str, job: int) -> int:
    if job == 1:
        os._exit(3)  # a worker lost mid-job, as a GPU fault or the OOM killer would
    return job
