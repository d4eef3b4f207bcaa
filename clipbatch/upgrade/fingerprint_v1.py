"""Fingerprint formula 1: what clipbatch hashed before the commit index (up to af75f36).

Formula 1 also hashed every source option, fetch settings and the source kind included,
and no compute precision. A committed file carrying a formula-1 fingerprint of the same
inputs is still reused (:func:`clipbatch.plan.fingerprint.accepted_fingerprints`), so the
upgrade to formula 2 re-encoded no table. Frozen: it must never change. May go when
tables written by 0.1.0 no longer need to be skipped without a re-encode: after 0.3.
"""

from __future__ import annotations

from clipbatch.config import EmbedConfig
from clipbatch.digest import digest, json_value
from clipbatch.records import ShardSpec

OPENAI_CONTEXT = 77  # formula 1 only ever ran OpenAI-format models
# Every SourceConfig field formula 1 hashed, frozen: fields added later must not change it.
FORMULA1_SOURCE_FIELDS = (
    "kind",
    "image_exts",
    "caption_ext",
    "caption_json_field",
    "image_column",
    "caption_column",
    "key_column",
    "image_base_url",
    "folder_shard_size",
    "table_shard_rows",
    "fetch_timeout_s",
    "fetch_retries",
    "fetch_concurrency",
    "fetch_max_bytes",
)


def formula1_fingerprint(
    shard: ShardSpec, config: EmbedConfig, model_sha256: str, kind: str | None = None
) -> str:
    """Formula 1, exactly as clipbatch wrote it before the commit index.

    ``kind`` replaces ``source.kind`` (formula 1 hashed it: 'auto', or what the user named).
    """
    source_options = {k: json_value(getattr(config.source, k)) for k in FORMULA1_SOURCE_FIELDS}
    if kind is not None:
        source_options["kind"] = kind
    tokens = min(config.model.max_caption_tokens or OPENAI_CONTEXT, OPENAI_CONTEXT)
    payload = {
        "source_uri": shard.uri,
        "source_version": shard.version,
        "members": list(shard.members),
        "sidecar": shard.sidecar_uri,
        "sidecar_version": shard.sidecar_version,
        "row_range": list(shard.row_range) if shard.row_range else None,
        "model_sha256": model_sha256,
        "options": {
            "dtype": config.sink.dtype,
            "normalize": config.sink.normalize,
            "max_caption_tokens": tokens,
            "preprocess": config.runtime.preprocess,
            "max_image_pixels": config.runtime.max_image_pixels,
            "source_options": source_options,
        },
        "schema_version": 1,
    }
    return digest(payload)
