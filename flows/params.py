"""Flat run parameters on top of the structured ``config``, and partition filling.

``prefect deployment run 'embed-dataset/embed-adhoc' --param source=... --param dest=...``
sends top-level keys only, and Prefect merges run parameters over deployment
parameters key by key. So the flow takes the full :class:`EmbedConfig` as ``config``
(the form the UI renders) plus a few optional flat overrides; this module merges them
into one validated config and fills ``{date}``/``{partition}`` URL templates.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from clipbatch_flows.partitions import fill, is_template, partition_for, partition_values

from clipbatch.config import EmbedConfig, build_config
from clipbatch.errors import ConfigError

logger = logging.getLogger(__name__)

# A flat name -> its dotted path in EmbedConfig. The CLI's flags (``--source-kind`` is
# ``source_kind``) and the flow's flat parameters share this one table.
CONFIG_PATHS = {
    "source": "source.url",
    "dest": "sink.url",
    "model": "model.name",
    "device": "runtime.device",
    "overwrite": "sink.overwrite",
    "retry_failed": "runtime.retry_failed",
    "source_kind": "source.kind",
    "checkpoint_sha256": "model.checkpoint_sha256",
    "precision": "runtime.precision",
    "shard_concurrency": "runtime.shard_concurrency",
    "decode_workers": "runtime.decode_workers",
    "task_runner": "runtime.task_runner",
    "gpus_per_shard": "runtime.gpus_per_shard",
    "preprocess": "runtime.preprocess",
    "max_error_ratio": "runtime.max_error_ratio",
    "dtype": "sink.dtype",
}
# The flow's flat parameters: what `prefect deployment run --param` users set most.
FLAT_OVERRIDES = {
    k: CONFIG_PATHS[k] for k in ("source", "dest", "model", "device", "overwrite", "retry_failed")
}


@dataclass(frozen=True)
class ResolvedRun:
    config: EmbedConfig
    partition: str | None


def resolve_config(
    config: EmbedConfig | None,
    overrides: dict[str, Any],
    partition: str | None = None,
    timezone: str = "UTC",
    offset_days: int = 0,
    scheduled: dt.datetime | None = None,
) -> ResolvedRun:
    """Merge flat overrides into ``config``, then fill URL templates for one partition.

    The partition is ``partition`` when given, else the date of ``scheduled`` (the run's
    scheduled start) in ``timezone`` shifted by ``offset_days``.
    """
    unknown = set(overrides) - set(FLAT_OVERRIDES)
    if unknown:
        raise ConfigError(f"unknown override(s): {sorted(unknown)}")
    raw: dict[str, Any] = config.model_dump(mode="json") if config is not None else {}
    dotted = {FLAT_OVERRIDES[k]: v for k, v in overrides.items() if v is not None}
    if config is None and not {"source.url", "sink.url"} <= set(dotted):
        raise ConfigError(
            "give either `config` (the full form) or both `source` and `dest`, e.g. "
            "--param source=s3://bucket/laion/ --param dest=s3://bucket/emb/"
        )
    resolved = build_config(raw, dotted)
    urls = (resolved.source.url, resolved.sink.url)
    if not any(is_template(u) for u in urls):
        if partition:
            raise ConfigError(
                f"partition {partition!r} given, but neither source nor dest has a "
                "{partition} or {date} placeholder to put it in"
            )
        return ResolvedRun(resolved, None)
    if not partition:
        if scheduled is None:
            scheduled = dt.datetime.now(dt.timezone.utc)
            logger.info("no scheduled start time (not a deployment run): partition from now")
        partition = partition_for(scheduled, timezone, offset_days)
    values = partition_values(partition)
    source_url, sink_url = (fill(u, values) for u in urls)
    filled = resolved.model_copy(
        update={
            "source": resolved.source.model_copy(update={"url": source_url}),
            "sink": resolved.sink.model_copy(update={"url": sink_url}),
        }
    )
    return ResolvedRun(filled, partition)
