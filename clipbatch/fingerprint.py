"""Shard fingerprints (design.md §4): what must match for a committed shard to be reused."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from clipbatch.config import EmbedConfig
from clipbatch.records import ShardSpec
from clipbatch.table import SCHEMA_VERSION


def output_options(config: EmbedConfig) -> dict[str, Any]:
    """Everything besides source and model that changes the bytes we write."""
    return {
        "dtype": config.sink.dtype,
        "normalize": config.sink.normalize,
        "max_caption_tokens": config.model.max_caption_tokens,
        "preprocess": config.runtime.preprocess,
        "max_image_pixels": config.runtime.max_image_pixels,
        "source_options": config.source.model_dump(exclude={"url", "storage"}, mode="json"),
    }


def shard_fingerprint(
    shard: ShardSpec,
    config: EmbedConfig,
    model_sha256: str,
    sidecar_version: str | None = None,
) -> str:
    """Hash of everything that decides a shard's output bytes (design.md §4).

    ``sidecar_version`` is the version of a webdataset shard's img2dataset
    ``.parquet``: its columns pass through into our rows, so a re-crawled sidecar
    next to an unchanged tar must redo the shard too.
    """
    payload = {
        "source_uri": shard.uri,
        "source_version": shard.version,
        "members": list(shard.members),
        "sidecar": shard.sidecar_uri,
        "sidecar_version": sidecar_version,
        "row_range": list(shard.row_range) if shard.row_range else None,
        "model_sha256": model_sha256,
        "options": output_options(config),
        "schema_version": SCHEMA_VERSION,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
