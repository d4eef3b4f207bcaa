"""The run record: ``{dest}/_lineage/{flow_run_id}.json`` (docs/design.md §6).

The record itself stays small whatever the run's size: identity, parameters, model,
progress and summary. It is rewritten atomically at the start, as shards finish
(throttled), and at the end, so it is always valid JSON and, if the run dies, says how
far it got: its ``status`` stays ``running`` (a crash) or becomes ``failed`` with the
error, and ``progress`` counts the shards done.

Every input shard and every output file go to immutable parts beside it, each written
once, ``PART_ROWS`` entries at a time: ``_lineage/{run_id}/inputs-00000.jsonl.gz``,
``outputs-00000.jsonl.gz``, ... The record names how many there are. So a run over
230,000 shards writes each entry once, never a growing record over and over.
:func:`read_run_record` reads the parts back into ``inputs`` and ``outputs`` lists.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from clipbatch import __version__
from clipbatch.config import EmbedConfig
from clipbatch.errors import RunStopped
from clipbatch.io.storage import get_fs, join, read_bytes, write_bytes_atomic
from clipbatch.lineage.redact import Redactor
from clipbatch.pipeline.summary import RunSummary
from clipbatch.plan.planner import RunPlan
from clipbatch.records import ShardResult

log = logging.getLogger(__name__)

LINEAGE_DIR = "_lineage"
RECORD_VERSION = 2
PART_ROWS = 1000  # entries per inputs/outputs part
PART_INTERVAL_S = 300.0  # pending outputs are written at least this often


def record_uri(dest: str, run_id: str) -> str:
    return join(dest, LINEAGE_DIR, f"{run_id}.json")


def part_uri(dest: str, run_id: str, kind: str, index: int) -> str:
    return join(dest, LINEAGE_DIR, run_id, f"{kind}-{index:05d}.jsonl.gz")


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def git_commit() -> str | None:
    """The code's commit: $CLIPBATCH_GIT_COMMIT (images), else the source checkout's HEAD."""
    env = os.environ.get("CLIPBATCH_GIT_COMMIT")
    if env:
        return env
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class RunRecordWriter:
    """A :class:`clipbatch.lineage.observe.RunObserver` that keeps the run record up to date."""

    def __init__(
        self,
        config: EmbedConfig,
        run_meta: dict[str, Any],
        redactor: Redactor | None = None,
        min_interval_s: float = 5.0,
        part_rows: int = PART_ROWS,
        part_interval_s: float = PART_INTERVAL_S,
    ) -> None:
        self.config = config
        self.redact = redactor or Redactor()
        self.run_id = str(run_meta.get("flow_run_id") or run_meta.get("run_id"))
        self.uri = record_uri(config.sink.url, self.run_id)
        self.min_interval_s = min_interval_s
        self._lock = threading.Lock()
        self._last_write = 0.0
        self.record: dict[str, Any] = {
            "record_version": RECORD_VERSION,
            "run_id": self.run_id,
            "status": "running",
            "started_at": utc_now(),
            "updated_at": None,
            "ended_at": None,
            "error": None,
            "prefect": {k: v for k, v in run_meta.items() if k != "run_id"},
            "code": {"package": "clipbatch", "version": __version__, "git_commit": git_commit()},
            "parameters": config.model_dump(mode="json"),
            "destination": config.sink.url,
            "model": None,
            "progress": {"shards_total": None, "shards_done": 0},
            "inputs": {"count": 0, "parts": 0},
            "outputs": {"count": 0, "parts": 0},
        }
        self.part_rows = part_rows
        self.part_interval_s = part_interval_s
        self._pending: list[dict[str, Any]] = []
        self._last_part = time.monotonic()
        self._by_status: dict[str, int] = {}
        self._rows_written = 0

    # -- observer hooks ---------------------------------------------------------
    def run_started(self, plan: RunPlan) -> None:
        ckpt = plan.checkpoint
        with self._lock:
            self.record["model"] = {
                **ckpt.identity(),
                "name": ckpt.display_name,
                "checkpoint_sha256": ckpt.sha256,
                "trained": ckpt.trained,
            }
        inputs = (
            {
                "shard": s.name,
                "uri": s.uri,
                "version": s.version,
                "kind": s.kind,
                "sidecar": s.sidecar_uri,
                "sidecar_version": s.sidecar_version,
                "members": len(s.members) or None,
                "row_range": list(s.row_range) if s.row_range else None,
                "fingerprint": plan.fingerprints.get(s.name),
            }
            for s in plan.shards
        )
        count, parts, chunk = 0, 0, []
        for entry in inputs:
            chunk.append(entry)
            count += 1
            if len(chunk) >= self.part_rows:
                self._write_part("inputs", parts, chunk)
                parts, chunk = parts + 1, []
        if chunk:
            self._write_part("inputs", parts, chunk)
            parts += 1
        with self._lock:
            self.record["inputs"] = {"count": count, "parts": parts}
            self.record["progress"] = self._progress(len(plan.shards))
        self._write(force=True)

    def shard_finished(self, result: ShardResult) -> None:
        with self._lock:
            self._pending.append(
                {
                    "shard": result.shard,
                    "uri": result.output_uri or None,
                    "status": result.status,
                    "rows": result.rows,
                    "counts": dict(result.counts),
                    "sha256": result.sha256,
                    "fingerprint": result.fingerprint,
                    "source_uri": result.source_uri,
                    "source_version": result.source_version,
                    "seconds": round(result.seconds, 3),
                    "error": result.error,
                    "finished_at": utc_now(),
                    # A retry of failed rows: how many were fetched again, how many are ok.
                    **({"retried": dict(result.retried)} if result.retried else {}),
                }
            )
            self._by_status[result.status] = self._by_status.get(result.status, 0) + 1
            if result.status == "committed":
                self._rows_written += result.rows
            self.record["outputs"]["count"] += 1
            self.record["progress"] = self._progress(self.record["progress"]["shards_total"])
        due = len(self._pending) >= self.part_rows or (
            time.monotonic() - self._last_part >= self.part_interval_s
        )
        if due:
            self._flush_outputs()
        self._write(force=False)

    def run_finished(self, summary: RunSummary, error: BaseException | None) -> None:
        self._flush_outputs()
        with self._lock:
            self.record["ended_at"] = utc_now()
            if error is None:
                self.record["status"] = "completed"
            elif isinstance(error, RunStopped | KeyboardInterrupt):
                self.record["status"] = "cancelled"  # stopped from outside: rerun to resume
            else:
                self.record["status"] = "failed"
            if error is not None:
                self.record["error"] = f"{type(error).__name__}: {error}"
            self.record["summary"] = {
                k: v for k, v in summary.to_dict().items() if k not in ("results", "dest")
            }
            self.record["progress"] = self._progress(self.record["progress"]["shards_total"])
        self._write(force=True)

    # -- writing ----------------------------------------------------------------
    def _progress(self, total: int | None) -> dict[str, Any]:
        return {
            "shards_total": total,
            "shards_done": sum(self._by_status.values()),
            "committed": self._by_status.get("committed", 0),
            "skipped": self._by_status.get("skipped", 0),
            "failed": self._by_status.get("failed", 0),
            "rows_written": self._rows_written,
        }

    def _flush_outputs(self) -> None:
        with self._lock:
            chunk, self._pending = self._pending, []
            index = self.record["outputs"]["parts"]
            if chunk:
                self.record["outputs"]["parts"] = index + 1
        self._last_part = time.monotonic()
        if chunk:
            self._write_part("outputs", index, chunk)

    def _write_part(self, kind: str, index: int, entries: list[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(self.redact(e), sort_keys=True) + "\n" for e in entries)
        fs, path = get_fs(part_uri(self.config.sink.url, self.run_id, kind, index), self.storage)
        write_bytes_atomic(fs, path, gzip.compress(lines.encode(), mtime=0))

    @property
    def storage(self) -> Any:
        return self.config.sink.storage

    def _write(self, force: bool) -> None:
        now = time.monotonic()
        # Throttled: a 100k-shard run must not rewrite the record 100k times.
        if not force and now - self._last_write < self.min_interval_s:
            return
        with self._lock:
            self.record["updated_at"] = utc_now()
            body = json.dumps(self.redact(self.record), indent=1, sort_keys=True).encode()
            self._last_write = now
        fs, path = get_fs(self.uri, self.storage)
        write_bytes_atomic(fs, path, body)


def read_parts(dest: str, run_id: str, kind: str, parts: int, storage: Any = None) -> list[Any]:
    """The entries of a record's ``inputs`` or ``outputs`` parts, in order."""
    out: list[Any] = []
    for index in range(parts):
        fs, path = get_fs(part_uri(dest, run_id, kind, index), storage)
        text = gzip.decompress(read_bytes(fs, path)).decode()
        out += [json.loads(line) for line in text.splitlines() if line]
    return out


def read_run_record(
    dest: str, run_id: str, storage: Any = None, expand: bool = True
) -> dict[str, Any] | None:
    """A run record, or None when that run left none; ``inputs`` and ``outputs`` are read
    from their parts into lists unless ``expand`` is false (records before version 2 had
    them inline).

    Example::

        from clipbatch.lineage.record import read_run_record

        record = read_run_record("s3://bucket/emb/vit-b-32/date=2026-12-03", run_id)
        record["status"], record["outputs"][:2]
    """
    fs, path = get_fs(record_uri(dest, run_id), storage)
    try:
        record = json.loads(read_bytes(fs, path))
    except FileNotFoundError:
        return None
    if expand:
        for kind in ("inputs", "outputs"):
            value = record.get(kind)
            if isinstance(value, dict):
                record[kind] = read_parts(dest, run_id, kind, int(value.get("parts") or 0), storage)
    return record
