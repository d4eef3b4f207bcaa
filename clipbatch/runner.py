"""Library-level entry points the Prefect tasks call: per-process contexts and one shard."""

from __future__ import annotations

import logging
import threading
from typing import Any

from clipbatch.config import EmbedConfig
from clipbatch.encode import ClipEncoder
from clipbatch.faults import crash_point
from clipbatch.manifest import update_manifest
from clipbatch.model import load_model
from clipbatch.pipeline import ProgressFn, ShardContext, process_shard
from clipbatch.plan import manifest_record
from clipbatch.records import ShardResult, ShardSpec
from clipbatch.sources import get_reader

log = logging.getLogger(__name__)

_manifest_lock = threading.Lock()
_progress: ProgressFn | None = None


def set_progress_listener(fn: ProgressFn | None) -> None:
    """Register a callback for rows done (the CLI's progress bar). Process-wide."""
    global _progress
    _progress = fn


def progress_listener() -> ProgressFn | None:
    """The registered rows-done callback, if any (device workers forward to it)."""
    return _progress


def shard_context(
    config: EmbedConfig, run_id: str, run_meta: dict[str, Any] | None = None
) -> ShardContext:
    """Reader, model and encoder for ``config``. The model is loaded once per process."""
    loaded = load_model(config.model, config.runtime.device, config.runtime.precision)
    encoder = ClipEncoder(loaded, config.runtime.batch_size, config.model.max_caption_tokens)
    return ShardContext(
        config=config,
        reader=get_reader(config.source),
        loaded=loaded,
        encoder=encoder,
        run_id=run_id,
        run_meta=dict(run_meta or {}),
        progress=_progress,
    )


def run_shard(
    shard: ShardSpec,
    config: EmbedConfig,
    run_id: str,
    fingerprint: str,
    run_meta: dict[str, Any] | None = None,
) -> ShardResult:
    """Encode, commit and index one shard."""
    ctx = shard_context(config, run_id, run_meta)
    result = process_shard(shard, ctx, fingerprint)
    crash_point("before_manifest", shard.name)
    # The thread lock saves pointless conditional-write races between this process's
    # own shard threads; update_manifest itself is safe across processes.
    with _manifest_lock:
        update_manifest(config.sink, {shard.name: manifest_record(result, run_id)})
    return result
