"""Worker processes for the fault tests: run shards with the library, no Prefect.

:func:`run_worker` runs in a child process: it cleans stale staging, plans, and runs
every shard still to do with :func:`clipbatch.pipeline.worker.run_plan`, the same shard call the
Prefect task makes, plus the commit index. Children fork from one multiprocessing *forkserver* that has
imported torch and clipbatch once, so each costs a fork, not a 10 s import. Faults
come from the environment the child sets for itself (``CLIPBATCH_CRASH_AT`` ...), so
the parent can have it SIGKILLed at exact points, or stop its storage under it.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipbatch.config import EmbedConfig
from clipbatch.pipeline.worker import run_plan
from clipbatch.plan.planner import plan_shards
from clipbatch.sink.staging import clean_staging

_CTX: Any = None


def context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["tests.faultworker"])
    return _CTX


def _child(config_json: str, run_id: str, env: dict[str, str], out: str) -> None:
    os.environ.update(env)
    config = EmbedConfig.model_validate_json(config_json)
    clean_staging(config.sink)
    plan = plan_shards(config)
    done = [r.shard for r in run_plan(plan, run_id)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out).write_text(
        json.dumps({"done": done, "skipped": len(plan.skipped), "peak_rss_kib": peak})
    )


@dataclass
class Worker:
    process: Any
    out: Path

    def wait(self, timeout: float = 120) -> tuple[int | None, dict[str, Any] | None]:
        """(exit code, the child's report or None if it did not finish)."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise TimeoutError("worker did not finish")
        report = json.loads(self.out.read_text()) if self.out.exists() else None
        return self.process.exitcode, report


def start_worker(
    config: EmbedConfig, out: Path, env: dict[str, str] | None = None, run_id: str | None = None
) -> Worker:
    proc = context().Process(
        target=_child,
        args=(config.model_dump_json(), run_id or uuid.uuid4().hex, dict(env or {}), str(out)),
    )
    proc.start()
    return Worker(proc, out)
