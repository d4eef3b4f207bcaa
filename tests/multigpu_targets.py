"""Jobs for the device-pool tests; a light module, since each spawned worker imports it."""

from __future__ import annotations

import os
import time
from pathlib import Path


def report(device: str, job: int, rendezvous: str, workers: int) -> tuple[str, int, str, int]:
    """Which device the worker was told, its pid, and what its environment says.

    The first job of each worker checks in under ``rendezvous`` and waits until ``workers``
    workers have: a pool that hands jobs to free workers must then have given one to each,
    so the jobs spread over every device by construction, not by timing.
    """
    here = Path(rendezvous)
    (here / f"{os.getpid()}").write_text(device)
    deadline = time.monotonic() + 60
    while len(list(here.iterdir())) < workers:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(list(here.iterdir()))} of {workers} workers checked in")
        time.sleep(0.01)  # polling the condition: every worker holds a job
    return device, os.getpid(), os.environ["CLIPBATCH_WORKER_DEVICE"], job


def die_on(device: str, job: int) -> int:
    if job == 1:
        os._exit(3)  # a worker lost mid-job, as a GPU fault or the OOM killer would
    return job
