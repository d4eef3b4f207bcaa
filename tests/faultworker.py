"""Worker processes for the fault tests: run shards with the library, no Prefect.

:func:`run_worker` runs in a child process: it cleans stale staging, plans, and runs
every shard still to do with :func:`clipbatch.pipeline.worker.run_plan`, the same shard call the
Prefect task makes, plus the commit index. Children fork from one multiprocessing *forkserver* that has
imported torch and clipbatch once, so each costs a fork, not a 10 s import. Faults
come from the environment the child sets for itself (``CLIPBATCH_CRASH_AT`` ...), so
the parent can have it SIGKILLed at exact points, or stop its storage under it.

A child that ends reports, success or failure, in its ``out`` file: ``ok``, the error
and whether :func:`clipbatch.errors.is_transient` calls it transient, the shards it
committed (``done``) and those that failed, before it exits (1 on failure). A child
killed by a signal reports nothing. With ``lineage``, the child keeps a run record
(:class:`clipbatch.lineage.record.RunRecordWriter`, as the flow does) under ``_lineage/``.
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
from clipbatch.errors import is_transient
from clipbatch.pipeline.worker import run_plan
from clipbatch.plan.planner import plan_shards
from clipbatch.records import ShardResult
from clipbatch.sink.staging import clean_staging

_CTX: Any = None


def context() -> Any:
    global _CTX
    if _CTX is None:
        _CTX = multiprocessing.get_context("forkserver")
        _CTX.set_forkserver_preload(["tests.faultworker"])
    return _CTX


def _child(
    config_json: str,
    run_id: str,
    env: dict[str, str],
    out: str,
    lineage: bool = False,
    torch_threads: int | None = None,
    log_file: str | None = None,
) -> None:
    os.environ.update(env)
    if log_file:  # the library's warnings (retries, clean-ups) to a file, not stderr
        import logging

        logging.basicConfig(
            filename=log_file,
            level=logging.INFO,
            format=f"%(asctime)s {os.getpid()} %(name)s %(levelname)s %(message)s",
        )
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    config = EmbedConfig.model_validate_json(config_json)
    results: list[ShardResult] = []
    report: dict[str, Any] = {"ok": False, "run_id": run_id, "skipped": None, "planned": None}
    observers: Any = None
    skipped: list[ShardResult] = []
    try:
        clean_staging(config.sink)
        plan = plan_shards(config)
        report["skipped"], report["planned"] = len(plan.skipped), len(plan.shards)
        if lineage:
            from clipbatch.lineage.observe import Observers
            from clipbatch.lineage.record import RunRecordWriter

            observers = Observers([RunRecordWriter(plan.config or config, {"run_id": run_id})])
            observers.run_started(plan)
            skipped = list(plan.skipped_results())
            for result in skipped:  # as the flow does: skipped shards are reported too
                observers.shard_finished(result)
        on_result = results.append
        if observers is not None:

            def on_result(result: ShardResult) -> None:
                results.append(result)
                observers.shard_finished(result)

        run_plan(plan, run_id, on_result=on_result)
        report["ok"] = True
        report["error"] = None
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}"
        report["transient"] = is_transient(e)
        raise
    finally:
        report["done"] = [r.shard for r in results if r.status == "committed"]
        report["failed"] = [r.shard for r in results if r.status != "committed"]
        report["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if observers is not None:
            from clipbatch.pipeline.summary import RunSummary

            summary = RunSummary(dest=config.sink.url, run_id=run_id)
            for r in skipped + results:
                summary.add(r)
            error = None if report["ok"] else RuntimeError(report["error"])
            observers.run_finished(summary, error)
        Path(out).write_text(json.dumps(report))


@dataclass
class Worker:
    process: Any
    out: Path

    def wait(self, timeout: float = 120) -> tuple[int | None, dict[str, Any] | None]:
        """(exit code, the child's report or None if it was killed before it could write
        one); raises TimeoutError if it has not ended within ``timeout``."""
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise TimeoutError("worker did not finish")
        report = json.loads(self.out.read_text()) if self.out.exists() else None
        return self.process.exitcode, report


def start_worker(
    config: EmbedConfig,
    out: Path,
    env: dict[str, str] | None = None,
    run_id: str | None = None,
    lineage: bool = False,
    torch_threads: int | None = None,
    log_file: Path | None = None,
) -> Worker:
    """A child running every shard of ``config`` still to do; ``torch_threads`` caps
    torch's intra-op threads (torch is already imported in the forkserver); ``log_file``
    receives its log (INFO and up) instead of stderr."""
    proc = context().Process(
        target=_child,
        args=(
            config.model_dump_json(),
            run_id or uuid.uuid4().hex,
            dict(env or {}),
            str(out),
            lineage,
            torch_threads,
            str(log_file) if log_file else None,
        ),
    )
    proc.start()
    return Worker(proc, out)
