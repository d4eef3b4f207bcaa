"""Removing what crashed writers left under ``{dest}/_tmp/`` and the local temp folder.

The next run removes the staging a crashed run left, and only that: a folder whose
process is gone on this host, or whose newest object is older than
``STALE_AFTER_SECONDS`` (a live commit stages, verifies and moves within seconds of the
upload, so an hour-old staged object has no live owner). A concurrent live run's staging
is never deleted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
from typing import Any

from clipbatch.config import SinkConfig
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs, is_local, join, remove_quietly
from clipbatch.sink.layout import LOCAL_PREFIX, SEP, TMP_DIR, host_name

log = logging.getLogger(__name__)

STALE_AFTER_SECONDS = 3600.0


def clean_staging(
    sink: SinkConfig, keep_run: str | None = None, stale_after: float = STALE_AFTER_SECONDS
) -> int:
    """Remove ``_tmp/`` folders left by crashed runs; keep live ones. Returns how many went."""
    clean_local_temp()
    fs, root = get_fs(join(sink.url, TMP_DIR), sink.storage)
    try:
        entries = with_retries(lambda: fs.ls(root, detail=True), f"list {root}")
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        path = entry["name"].rstrip("/")
        folder = path.rsplit("/", 1)[-1]
        if keep_run and folder.split(SEP, 1)[0] == keep_run and _owner_alive(folder):
            continue
        reason = _stale_reason(fs, path, folder, stale_after)
        if reason is None:
            log.info("leaving %s: it belongs to a live run", path)
            continue
        log.info("removing stale staging %s (%s)", path, reason)
        remove_quietly(fs, path, recursive=True)
        removed += 1
    return removed


def remove_empty_tmp(sink: SinkConfig) -> bool:
    """Remove ``{dest}/_tmp/`` when nothing is left in it (local disks; object stores have no
    empty folders). A concurrent run's staging keeps it; one that starts staging right
    after recreates it (the writer retries its folder). Whether it went."""
    if not is_local(sink.url):
        return False
    _, root = get_fs(join(sink.url, TMP_DIR), sink.storage)
    try:
        os.rmdir(root)
    except OSError:  # absent, or not empty: a live run's staging, or a crashed run's
        return False
    return True


def clean_local_temp(directory: str | None = None) -> int:
    """Remove this host's local shard temp files whose process is gone (SIGKILL, OOM kill)."""
    directory = directory or tempfile.gettempdir()
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            rest = entry.name[len(LOCAL_PREFIX) :]
            pid = rest.split("-", 1)[0]
            if entry.name.startswith(LOCAL_PREFIX) and pid.isdigit() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
                    removed += 1
    return removed


def _owner_alive(folder: str) -> bool | None:
    """True/False when the folder's owner is a process on this host; None if unknown."""
    parts = folder.split(SEP)
    if len(parts) != 4 or parts[1] != host_name() or not parts[2].isdigit():
        return None
    return _pid_alive(int(parts[2]))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        import psutil

        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except ImportError:
        pass
    except Exception:  # the process vanished while we looked
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_reason(fs: Any, path: str, folder: str, stale_after: float) -> str | None:
    alive = _owner_alive(folder)
    if alive is False:
        return "its process has exited"
    if alive:
        return None
    try:
        infos = with_retries(lambda: fs.find(path, detail=True), f"list {path}")
    except FileNotFoundError:
        return "empty"
    if isinstance(infos, dict):
        infos = list(infos.values())
    if not infos:
        return "empty"
    newest = max(_mtime(i) for i in infos)
    age = time.time() - newest
    return f"untouched for {age:.0f}s" if age > stale_after else None


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        with contextlib.suppress(TypeError, ValueError):
            return float(value)
    return time.time()  # unknown age: treat as fresh, never delete what may be live
