"""Shard fingerprints (docs/design.md §4): exactly what decides a shard's output, and no more.

A committed shard is reused when its file carries the fingerprint the plan computes now.
The fingerprint hashes what changes the table's values or schema:

- the source shard: URI, version, members (folder slices), row range (table slices), and
  the img2dataset sidecar's URI and version (its columns pass through);
- the model: the checkpoint's sha256, and for families other than OpenAI's, the identity
  that defines architecture and preprocessing (family, architecture, tag, config hash);
- the output options: storage dtype, normalisation, the caption token limit in effect,
  the preprocessing mode, the pixel limit, and the **compute precision** in effect (fp16,
  bf16 and fp32 give different vectors; a table never mixes them silently);
- the reader options that decide which bytes form a row: image extensions, caption
  extension or JSON field, table columns, the image base URL, the fetch size limit;
- the table schema version.

Left out, because they change neither a value nor the schema of any row: the source kind
(detected or explicit: it only picks the reader), fetch concurrency, timeouts and
retries (they decide only whether a transient failure happens, not what a success
holds), task retries, batch size, workers, devices and task runner, ``max_error_ratio``
(a shard over it is still written), and ``row_group_size`` (file layout, not content).
``folder_shard_size`` and ``table_shard_rows`` are covered by the members and row range.

**Formula versions.** Formula 1 (before the commit index,
:mod:`clipbatch.upgrade.fingerprint_v1`) also hashed every source option, fetch settings
and kind included, and no precision. A file carrying a formula-1 fingerprint of the same
inputs is still recognised (:func:`accepted_fingerprints`), so an upgrade never
re-encodes a finished table.
"""

from __future__ import annotations

from typing import Any

from clipbatch.config import EmbedConfig, RuntimeConfig
from clipbatch.digest import digest, json_value
from clipbatch.records import ShardSpec
from clipbatch.sink.schema import SCHEMA_VERSION
from clipbatch.upgrade.fingerprint_v1 import OPENAI_CONTEXT, formula1_fingerprint

FORMULA = 2

# Source options that decide which bytes form a row (formula 2).
READER_OPTIONS = (
    "image_exts",
    "caption_ext",
    "caption_json_field",
    "image_column",
    "caption_column",
    "key_column",
    "image_base_url",
    "fetch_max_bytes",
    "allow_networks",
)


def effective_precision(runtime: RuntimeConfig, cuda_here: bool) -> str:
    """The compute precision the shard tasks will use: fp16, bf16 or fp32.

    'auto' is fp16 on CUDA and fp32 elsewhere. The device is the one tasks run on: named
    devices decide it; ``device: auto`` means CUDA when this host has it, or, with a
    Dask/Ray cluster, when shards claim GPUs (``gpus_per_shard``). The plan pins the result
    into the config the tasks get, so what is fingerprinted is what runs.
    """
    if runtime.precision != "auto":
        return runtime.precision
    devices = list(runtime.devices) or [runtime.device]
    if any(d == "all" or d.startswith("cuda") for d in devices):
        return "fp16"
    if all(d in ("cpu", "mps") for d in devices):
        return "fp32"
    remote = runtime.task_runner not in (None, "", "threads")
    if remote and runtime.gpus_per_shard > 0:
        return "fp16"
    return "fp16" if cuda_here else "fp32"


def caption_tokens(config: EmbedConfig, context_length: int | None) -> int:
    """The caption token limit in effect: the configured one, clamped to the model's context."""
    configured = config.model.max_caption_tokens
    context = context_length or OPENAI_CONTEXT
    return min(configured, context) if configured else context


def output_options(
    config: EmbedConfig, precision: str | None = None, context_length: int | None = None
) -> dict[str, Any]:
    """The file metadata's ``options``: what the fingerprint hashes, plus every source
    option (``source_options``), which ``clipbatch lineage`` needs to list a folder
    source's slices again."""
    return {
        **fingerprint_options(config, precision, context_length),
        "source_options": config.source.model_dump(exclude={"url", "storage"}, mode="json"),
    }


def fingerprint_options(
    config: EmbedConfig, precision: str | None = None, context_length: int | None = None
) -> dict[str, Any]:
    """Everything besides source shard and model that changes the table (formula 2)."""
    return {
        "dtype": config.sink.dtype,
        "normalize": config.sink.normalize,
        "caption_tokens": caption_tokens(config, context_length),
        "preprocess": config.runtime.preprocess,
        "max_image_pixels": config.runtime.max_image_pixels,
        "precision": precision or config.runtime.precision,
        "reader": {k: json_value(getattr(config.source, k)) for k in READER_OPTIONS},
    }


def shard_fingerprint(
    shard: ShardSpec,
    config: EmbedConfig,
    model_sha256: str,
    precision: str,
    model_identity: dict[str, Any] | None = None,
    context_length: int | None = None,
) -> str:
    """Formula 2: the hash of what decides a shard's output (see the module docstring)."""
    payload = {
        "formula": FORMULA,
        "source": _source_part(shard),
        "model": {
            "sha256": model_sha256,
            **({"identity": model_identity} if model_identity else {}),
        },
        "options": fingerprint_options(config, precision, context_length),
        "schema_version": SCHEMA_VERSION,
    }
    return digest(payload)


def accepted_fingerprints(
    shard: ShardSpec,
    config: EmbedConfig,
    current: str,
    model_sha256: str,
    model_identity: dict[str, Any] | None,
    detected_kind: str,
) -> set[str]:
    """The fingerprints a committed file may carry to be reused: the current formula's,
    and formula 1's from the same inputs (OpenAI-format models only: formula 1 knew no
    other family), with the kind as it was given ('auto') or as detected."""
    accepted = {current}
    if model_identity is None:
        accepted.add(formula1_fingerprint(shard, config, model_sha256))
        if config.source.kind != detected_kind:
            accepted.add(formula1_fingerprint(shard, config, model_sha256, detected_kind))
        if config.source.kind != "auto":
            accepted.add(formula1_fingerprint(shard, config, model_sha256, "auto"))
    return accepted


def _source_part(shard: ShardSpec) -> dict[str, Any]:
    return {
        "uri": shard.uri,
        "version": shard.version,
        "members": list(shard.members),
        "sidecar": shard.sidecar_uri,
        "sidecar_version": shard.sidecar_version,
        "row_range": list(shard.row_range) if shard.row_range else None,
    }
