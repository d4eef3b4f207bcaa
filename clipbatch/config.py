"""Validated configuration: one model, split into source, model, runtime and sink parts.

The same :class:`EmbedConfig` is the Prefect flow parameter (the UI renders it as a
form), loads from YAML, and is built by the CLI. Below the flow each function takes
only the part it needs. Credentials never live here: they come from the environment
an AWS profile named by ``storage.profile``, or a Prefect block named by
``storage.credentials_block`` (Prefect stores parameters in plain text).
"""

from __future__ import annotations

import copy
import ipaddress
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from clipbatch.errors import ConfigError

# The choices of the config's enumerated fields: the CLI's flags take theirs from here.
SourceKind = Literal["auto", "webdataset", "folder", "table"]
Precision = Literal["auto", "fp32", "fp16", "bf16"]
PreprocessMode = Literal["exact", "fast", "gpu"]
EmbeddingDtype = Literal["float16", "float32"]

# Keys that would carry secrets inside fsspec storage options. We refuse them in
# parameters because Prefect stores flow parameters in plain text.
_SECRET_OPTION_KEYS = {
    "key",
    "secret",
    "token",
    "password",
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "session_token",
    "account_key",
    "sas_token",
    "client_secret",
}


def _option_keys(options: Any) -> set[str]:
    """Every key of a nested options mapping, lower-cased."""
    if not isinstance(options, dict):
        return set()
    keys = {str(k).lower() for k in options}
    for v in options.values():
        keys |= _option_keys(v)
    return keys


class _Frozen(BaseModel):
    # Validation errors must not echo values back: a credential pasted into a field
    # would otherwise land in logs and in Prefect's stored flow-run state.
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


class StorageOptions(_Frozen):
    """How to reach object storage. Secrets come from the environment, a profile or a
    Prefect block, never from here."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000 for MinIO."
    )
    profile: str | None = Field(None, description="AWS profile name from ~/.aws/config.")
    region: str | None = Field(None, description="Object store region.")
    anon: bool = Field(False, description="Anonymous access (public buckets).")
    credentials_block: str | None = Field(
        None,
        description="A Prefect block holding the credentials, by name: a prefect-aws "
        "AwsCredentials ('aws-credentials/NAME', or just NAME) or MinIOCredentials "
        "('minio-credentials/NAME'). Loaded where the work runs; only the name is stored.",
        pattern=r"^([a-z0-9-]+/)?[A-Za-z0-9][A-Za-z0-9_.-]*$",
    )
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Further fsspec options (non-secret), passed through as-is.",
    )

    @field_validator("extra")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        # Nested too: client_kwargs={"aws_secret_access_key": ...} reaches botocore as well.
        leaked = _SECRET_OPTION_KEYS.intersection(_option_keys(value))
        if leaked:
            raise ValueError(
                f"storage option(s) {sorted(leaked)} look like credentials; parameters are "
                "stored in plain text, so pass credentials through the environment "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), an AWS profile, or a Prefect block"
            )
        return value


class SourceConfig(_Frozen):
    """Where the images and captions come from (docs/design.md §1)."""

    url: str = Field(
        ...,
        description="Dataset URL: s3://bucket/prefix/, a local folder, a file, a glob, or a "
        "brace pattern such as s3://b/laion/{00000..00099}.tar",
        min_length=1,
    )
    kind: SourceKind = Field("auto", description="Source layout; 'auto' detects it from the URL.")
    image_exts: tuple[str, ...] = Field(
        ("jpg", "jpeg", "png", "webp"),
        description="Image member extensions, in priority order (webdataset, folder). "
        "Empty for a caption-only dataset.",
    )
    caption_ext: str | None = Field(
        "txt",
        description="Caption member extension (webdataset, folder); null for an image-only "
        "dataset, whose rows are then never 'missing_caption'.",
    )
    caption_json_field: str | None = Field(
        None, description="Read the caption from this field of the .json member instead."
    )
    image_column: str | None = Field(
        "image",
        description="Image column (table sources): a relative path, an s3:// or other fsspec "
        "URI, an http(s):// URL, bytes, or a Hugging Face {bytes, path} struct. Null for a "
        "caption-only table.",
    )
    caption_column: str | None = Field(
        "caption", description="Caption column (table sources); null for an image-only table."
    )
    key_column: str | None = Field(
        None,
        description="Key column (table sources); by default a column named 'key' when the "
        "table has one, else the key is {shard}/{row}.",
    )
    image_base_url: str | None = Field(
        None,
        description="Where relative image paths in a table resolve; default the table "
        "file's own folder.",
    )
    folder_shard_size: int = Field(
        10_000, ge=1, le=10_000_000, description="Images per shard for folder sources."
    )
    table_shard_rows: int | None = Field(
        None,
        ge=1,
        description="Split Parquet tables into shards of about this many rows, at row-group "
        "boundaries; null keeps one shard per file.",
    )
    fetch_timeout_s: float = Field(
        10.0, gt=0, le=600, description="Timeout per image fetch (table URLs and objects)."
    )
    fetch_retries: int = Field(
        2, ge=0, le=10, description="Retries of a fetch that failed transiently (timeout, 5xx)."
    )
    fetch_concurrency: int = Field(
        16, ge=1, le=256, description="Image fetches in flight at once, per shard."
    )
    fetch_max_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="Fetched images larger than this are 'too_large'."
    )
    allow_networks: tuple[str, ...] = Field(
        (),
        description="Networks (CIDR) that image URLs may reach besides the public internet, "
        "e.g. ['10.20.0.0/16'] for an internal image store. Loopback, link-local (cloud "
        "metadata), private and reserved addresses are refused by default: such rows get "
        "the status 'blocked_url'.",
    )
    storage: StorageOptions = Field(default_factory=StorageOptions)

    @field_validator("allow_networks")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, entry in enumerate(value):
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                # Not echoed: validation errors never repeat input values.
                raise ValueError(
                    f"allow_networks entry {i} is not a network; use CIDR, e.g. 10.20.0.0/16"
                ) from None
        return value


class ModelConfig(_Frozen):
    """Which CLIP to run. The model name and the caption limit came from the services' config."""

    name: str = Field(
        "ViT-B/32",
        description="OpenAI clip: a clip name (ViT-B/32, ...), 'tiny' (built in), a local "
        "checkpoint path or an object-store URI (s3://...), optionally prefixed openai:. "
        "open_clip: open_clip:ARCH:TAG (e.g. open_clip:ViT-H-14:laion2b_s32b_b79k), "
        "open_clip:local-dir:PATH_OR_URL, open_clip:hf-hub:ORG/REPO. Transformers: "
        "hf:ORG/NAME[@REVISION], or hf:PATH_OR_URL for a save_pretrained folder (a path "
        "starts with /, ./ or ../).",
        min_length=1,
    )
    checkpoint_sha256: str | None = Field(
        None,
        description="Expected sha256 of the checkpoint file; loading fails when it differs.",
        pattern=r"^[0-9a-f]{64}$",
    )
    max_caption_tokens: int | None = Field(
        None,
        ge=2,
        le=4096,
        description="Captions are tokenised and truncated to this many tokens, clamped to the "
        "model's context length (77 for CLIP, 64 for SigLIP). Empty (the default): the "
        "model's own context length. The value in effect is in each file's metadata.",
    )
    storage: StorageOptions = Field(default_factory=StorageOptions)


class RuntimeConfig(_Frozen):
    """How to run: device, batching, concurrency, error budget."""

    device: str = Field(
        "auto",
        description="'auto' (CUDA when present), 'cpu', 'cuda' or 'cuda:N'.",
        pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$",
    )
    precision: Precision = Field("auto", description="'auto' is fp16 on CUDA and fp32 on the CPU.")
    batch_size: int = Field(256, ge=1, le=65_536, description="Images per forward pass.")
    # A separate switch, not batch_size='auto': the UI form and the server's parameter
    # check keep a plain integer field with its bounds.
    auto_batch_size: bool = Field(
        False,
        description="Find the largest batch that fits on the GPU, probed once per process "
        "starting from batch_size (the CLI's --batch-size auto). The OOM back-off remains.",
    )
    devices: tuple[str, ...] = Field(
        (),
        description="Several devices on one node, e.g. ['cuda:0', 'cuda:1'] or ['all']: one "
        "worker process per device, shards spread across them. Empty: just 'device'.",
    )
    decode_workers: int = Field(
        0, ge=0, le=256, description="Decode/preprocess threads; 0 picks one per core."
    )
    shard_concurrency: int = Field(
        1, ge=1, le=64, description="Shard task runs in flight at once (bounded task runner)."
    )
    shards_per_task: int = Field(
        0,
        ge=0,
        le=100_000,
        description="Shards per task run, each still committed on its own. 0 (auto): one "
        "up to 1,000 shards, then enough that a flow run makes about 1,000 task runs.",
    )
    preprocess: PreprocessMode = Field(
        "exact",
        description="'exact' matches the model's own preprocessing; 'fast' uses JPEG draft "
        "decoding and trades a little fidelity for speed; 'gpu' decodes JPEGs batched on "
        "the model's device (nvJPEG on CUDA) and resizes there, other images as 'fast'.",
    )
    max_image_pixels: int = Field(
        89_478_485,
        ge=1,
        description="Images with more pixels are rejected from the header (decompression bombs).",
    )
    max_error_ratio: float = Field(
        1.0, ge=0.0, le=1.0, description="Fail a shard whose failed-row ratio exceeds this."
    )
    retry_failed: bool = Field(
        False,
        description="Fetch again the rows of committed shards whose images failed for a "
        "transient reason (status fetch_transient; fetch_error in tables written before "
        "it existed). Only those rows are fetched and encoded; the others are carried over "
        "from the committed file, which is rewritten through the commit protocol.",
    )
    max_fetch_attempts: int = Field(
        3,
        ge=1,
        le=100,
        description="A row that keeps failing transiently is fetched by at most this many "
        "runs in all (each with its fetch_retries); then it stays failed.",
    )
    task_retries: int = Field(3, ge=0, le=20, description="Task retries on transient errors.")
    retry_delay_seconds: float = Field(
        2.0, ge=0.0, le=600.0, description="Base delay for exponential task retry backoff."
    )
    task_runner: str | None = Field(
        None,
        description="Where shard tasks run: empty for this process's thread pool, "
        "'dask://host:8786' for an existing Dask scheduler, 'ray://host:10001' for Ray.",
        pattern=r"^(threads|(dask|ray)://[^\s/]+)$",
    )
    gpus_per_shard: float = Field(
        0.0,
        ge=0.0,
        le=64.0,
        description="GPU slots each shard task claims on Dask (worker resource 'GPU', "
        "start workers with --resources GPU=1) or Ray (num_gpus); 0 claims none.",
    )


class SinkConfig(_Frozen):
    """Where and how the embedding table is written (docs/design.md §2-3)."""

    url: str = Field(..., description="Destination URL for the Parquet table.", min_length=1)
    dtype: EmbeddingDtype = Field("float16", description="Embedding storage dtype.")
    normalize: bool = Field(True, description="L2-normalise embeddings.")
    overwrite: bool = Field(False, description="Redo shards even when their fingerprint matches.")
    row_group_size: int = Field(4096, ge=64, le=1_000_000, description="Rows per row group.")
    storage: StorageOptions = Field(default_factory=StorageOptions)


class EmbedConfig(_Frozen):
    """Everything one embedding run needs; the flow's one parameter."""

    source: SourceConfig
    sink: SinkConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        # Accept {"source": "s3://...", "dest": "s3://..."} as well as the full form, so a
        # YAML file or `--params` can stay short.
        if isinstance(data, dict):
            data = dict(data)
            if isinstance(data.get("source"), str):
                data["source"] = {"url": data["source"]}
            if "dest" in data and "sink" not in data:
                dest = data.pop("dest")
                data["sink"] = {"url": dest} if isinstance(dest, str) else dest
            if isinstance(data.get("sink"), str):
                data["sink"] = {"url": data["sink"]}
            if isinstance(data.get("model"), str):
                data["model"] = {"name": data["model"]}
        return data


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> EmbedConfig:
    """Load an :class:`EmbedConfig` from YAML, applying dotted-key ``overrides`` on top.

    Example::

        from clipbatch.config import load_config

        config = load_config("run.yaml", overrides={"runtime.device": "cuda:0"})
    """
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping, got {type(raw).__name__}")
    return build_config(raw, overrides)


def build_config(raw: dict[str, Any], overrides: dict[str, Any] | None = None) -> EmbedConfig:
    """Validate a raw mapping plus dotted overrides (``runtime.batch_size=64``).

    Example::

        from clipbatch.config import build_config

        config = build_config(
            {"source": "s3://bucket/laion/", "dest": "s3://bucket/emb/", "model": "ViT-B/32"},
            overrides={"runtime.batch_size": 128},
        )
        config.runtime.batch_size  # 128
    """
    data = EmbedConfig._shorthand(raw)  # normalise shorthand before merging overrides
    data = copy.deepcopy(data)
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    try:
        return EmbedConfig.model_validate(data)
    except ValueError as e:
        raise ConfigError(f"invalid configuration:\n{e}") from e
