"""Model loading for every family: OpenAI clip, open_clip and transformers.

:func:`resolve_checkpoint` turns a model name (grammar: :mod:`clipbatch.models.names`)
into a :class:`ResolvedCheckpoint`: the files on local disk (fetched from the hub or
object storage when needed), their sha256, and the identity that fingerprints and
lineage record. :func:`load_model` loads it once per process with its family's backend
(:mod:`clipbatch.models`). The preprocessing comes from the model itself, so it never
drifts from the model.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clipbatch.config import ModelConfig
from clipbatch.errors import ChecksumMismatchError, ConfigError
from clipbatch.models import files
from clipbatch.models.base import ModelBackend, ResolvedCheckpoint
from clipbatch.models.names import parse_model_name
from clipbatch.models.openai import OpenAIBackend
from clipbatch.models.registry import family_module
from clipbatch.preprocess.resize import ImagePreprocess

log = logging.getLogger(__name__)


def resolve_checkpoint(cfg: ModelConfig) -> ResolvedCheckpoint:
    """Find (and fetch, for hubs and object stores) the checkpoint, and its sha256.

    Raises :class:`ConfigError` for unknown or malformed names and missing extras, and
    :class:`ChecksumMismatchError` when the user's expected sha256 differs.
    """
    name = parse_model_name(cfg.name)
    resolved = family_module(name.family).resolve(name, cfg)
    if cfg.checkpoint_sha256 and cfg.checkpoint_sha256 != resolved.sha256:
        raise ChecksumMismatchError(
            f"checkpoint {cfg.name!r} has sha256 {resolved.sha256}, expected {cfg.checkpoint_sha256}"
        )
    return resolved


def fetch_remote_checkpoint(uri: str, cfg: ModelConfig) -> Path:
    """Download an object-store checkpoint once into the local cache, keyed by its version."""
    return files.fetch_remote_checkpoint(uri, cfg.storage)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} was asked for, but CUDA is not available here")
    return device


def resolve_precision(precision: str, device: str) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if device == "cpu" and precision == "fp16":
        raise ConfigError("fp16 is not supported on the CPU; use fp32 or bf16")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


@dataclass
class LoadedModel:
    """A loaded model, its family's backend, and where it runs.

    ``backend`` may be left out for an OpenAI-format ``clip.model.CLIP`` (tests wrap
    one): it is then built from ``model`` and ``preprocess``.
    """

    model: torch.nn.Module
    preprocess: Any  # the family's own image transform (the reference)
    checkpoint: ResolvedCheckpoint
    device: str
    dtype: torch.dtype
    backend: ModelBackend = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = OpenAIBackend(self.model, self.preprocess)

    @property
    def family(self) -> str:
        return self.backend.family

    @property
    def image_preprocess(self) -> ImagePreprocess:
        """The family's image preprocessing, as data (size, resize, crop, mean, std)."""
        return self.backend.image

    @property
    def input_resolution(self) -> int:
        """The model's input side (the larger one for a non-square input)."""
        return self.backend.image.n_px

    @property
    def embed_dim(self) -> int:
        return self.backend.embed_dim

    @property
    def context_length(self) -> int:
        return self.backend.context_length


def load_model(cfg: ModelConfig, device: str = "auto", precision: str = "auto") -> LoadedModel:
    """Load (once per process: :mod:`clipbatch.process`) the model for ``cfg``.

    Example::

        from clipbatch.config import ModelConfig
        from clipbatch.models.loading import load_model

        model = load_model(ModelConfig(name="ViT-B/32"), device="cuda", precision="fp16")
        model.embed_dim, model.context_length  # 512, 77
        model.preprocess  # the model's own preprocessing, as data
    """
    from clipbatch.process import process_context

    process = process_context()
    checkpoint = resolve_checkpoint(cfg)
    dev = resolve_device(device)
    dtype = resolve_precision(precision, dev)
    identity = repr(checkpoint.fingerprint_identity())
    key = (checkpoint.sha256, identity, dev, str(dtype))
    with process.lock:
        if key in process.models:
            cached = process.models[key]
            # The same model under another name (a copy in object storage, openai:...): the
            # loaded weights are shared, the name and location are this call's.
            if cached.checkpoint != checkpoint:
                return dataclasses.replace(cached, checkpoint=checkpoint)
            return cached
        loaded = _load(checkpoint, dev, dtype)
        process.models[key] = loaded
        process.model_loads += 1
        log.info(
            "loaded %s (%s, sha256 %s…) on %s as %s",
            checkpoint.display_name,
            checkpoint.family,
            checkpoint.sha256[:12],
            dev,
            dtype,
        )
        return loaded


def _load(checkpoint: ResolvedCheckpoint, device: str, dtype: torch.dtype) -> LoadedModel:
    module = family_module(checkpoint.family)
    if checkpoint.family == "openai":
        model, preprocess = module.load(checkpoint, device, dtype)
        backend: ModelBackend = OpenAIBackend(model, preprocess)
    else:
        backend = module.load(checkpoint, device, dtype)
        model, preprocess = backend.model, backend.reference_preprocess
    return LoadedModel(
        model=model,
        preprocess=preprocess,
        checkpoint=checkpoint,
        device=device,
        dtype=dtype,
        backend=backend,
    )
