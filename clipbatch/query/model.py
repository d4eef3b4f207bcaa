"""A table's own model, as its files record it: query vectors comparable with the table's.

Vectors are only comparable when they come from the same model, preprocessing and
precision. A table's files record all three (``clipbatch`` file metadata): the model's
name and checkpoint sha256 (loading fails if the checkpoint differs), its config files'
sha256, the caption limit in effect, the compute precision and the preprocessing mode.
:class:`TableModel` loads the model pinned to those, and encodes texts and images
through the pipeline's own paths (the tokenizer and trimming of
:class:`~clipbatch.encode.encoder.ClipEncoder`, the decoders of
:mod:`clipbatch.preprocess.decode`).

Example::

    from clipbatch.query.model import TableModel
    from clipbatch.tables.table import open_table

    model = TableModel.of(open_table("./clipbatch-demo/embeddings"))
    vectors, truncated = model.encode_texts(["a red circle"])
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipbatch.config import ModelConfig, StorageOptions
from clipbatch.errors import ConfigError
from clipbatch.preprocess.decode import DecodeOptions, finish_on_device, prepare
from clipbatch.records import OK, PreparedSample, RawSample
from clipbatch.tables.table import OutputTable
from clipbatch.tables.vectors import normalize_rows

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 89_478_485


def model_config_for(model: dict[str, Any], storage: StorageOptions | None = None) -> ModelConfig:
    """The model that wrote a table (``model``: its files' ``model`` metadata), pinned to
    its recorded checkpoint sha256.

    A transformers hub model named without a revision is pinned to the revision that wrote
    the table, so a newer upload on the hub cannot answer the query. The caption limit is
    the one the table was written with.
    """
    from clipbatch.models.names import HUB, parse_model_name

    name = model["name"]
    parsed = parse_model_name(name)
    hub_unpinned = parsed.family == "hf" and parsed.form == HUB and not parsed.revision
    if hub_unpinned and model.get("revision"):
        name = f"{name}@{model['revision']}"
    limit = model.get("context_length")
    return ModelConfig(
        name=name,
        checkpoint_sha256=model["checkpoint_sha256"],
        max_caption_tokens=int(limit) if limit else None,
        storage=storage or StorageOptions(),
    )


@dataclass(frozen=True)
class Recorded:
    """What a table's files say about how its vectors were made."""

    model: dict[str, Any]
    precision: str = "auto"  # fp32 | fp16 | bf16; auto for files before precision was recorded
    preprocess: str = "exact"
    max_image_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def of(cls, metadata: dict[str, Any]) -> Recorded:
        """From one file's ``clipbatch`` metadata (or a kNN build's ``model`` alone)."""
        if "model" not in metadata:  # a kNN build records the model only
            return cls(model=metadata)
        options = metadata.get("options") or {}
        return cls(
            model=metadata["model"],
            precision=str(options.get("precision") or "auto"),
            preprocess=str((metadata.get("preprocessing") or {}).get("mode") or "exact"),
            max_image_pixels=int(options.get("max_image_pixels") or DEFAULT_MAX_PIXELS),
        )


class TableModel:
    """The model, precision and preprocessing a table was written with, loaded once.

    ``device`` is where queries are encoded. A table written in fp16 (on a GPU) queried on
    the CPU, which has no fp16, runs fp32 and says so in :meth:`describe`: its vectors
    then differ from the table's by float16 rounding (cosine about 0.9999).
    """

    def __init__(
        self,
        recorded: Recorded,
        device: str = "cpu",
        storage: StorageOptions | None = None,
        batch_size: int = 64,
        max_image_pixels: int | None = None,
    ) -> None:
        from clipbatch.encode.encoder import ClipEncoder
        from clipbatch.models.loading import load_model, resolve_device

        self.recorded = recorded
        meta = recorded.model
        config = model_config_for(meta, storage)
        self.device = resolve_device(device)
        self.precision = recorded.precision
        if self.precision == "fp16" and self.device == "cpu":
            self.precision = "fp32"
            log.warning("the table was encoded in fp16; the CPU has none: queries run fp32")
        self.loaded = load_model(config, self.device, self.precision)
        if self.loaded.embed_dim != meta["embed_dim"]:
            raise ConfigError(
                f"model {meta['name']!r} has embedding dim {self.loaded.embed_dim}, "
                f"the table {meta['embed_dim']}"
            )
        recorded_config = meta.get("config_sha256")
        if recorded_config and recorded_config != self.loaded.checkpoint.config_sha256:
            raise ConfigError(
                f"model {meta['name']!r}: its config files (tokenizer, preprocessing) have "
                f"sha256 {self.loaded.checkpoint.config_sha256}, the table was written with "
                f"{recorded_config}"
            )
        self.encoder = ClipEncoder(self.loaded, batch_size, config.max_caption_tokens)
        self.decode = DecodeOptions(
            n_px=self.loaded.input_resolution,
            mode=recorded.preprocess,
            max_pixels=max_image_pixels or recorded.max_image_pixels,
            geometry=self.loaded.image_preprocess,
        )

    @classmethod
    def of(
        cls,
        table: OutputTable,
        device: str = "cpu",
        storage: StorageOptions | None = None,
        **kwargs: Any,
    ) -> TableModel:
        """The model of ``table`` (every file must record the same one)."""
        table.model_metadata()  # raises when the files disagree
        first = next(f.metadata for f in table.files if f.metadata and "model" in f.metadata)
        return cls(Recorded.of(first), device, storage or table.storage, **kwargs)

    def describe(self) -> dict[str, Any]:
        meta = self.recorded.model
        return {
            "name": meta["name"],
            "checkpoint_sha256": meta["checkpoint_sha256"],
            "embed_dim": meta["embed_dim"],
            "precision": self.precision,
            "recorded_precision": self.recorded.precision,
            "preprocess": self.recorded.preprocess,
            "max_caption_tokens": self.encoder.context_tokens,
            "device": self.device,
        }

    # -- text ---------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """L2-normalised float32 vectors, and which texts were truncated to the limit."""
        vectors, truncated = self.encoder.encode_texts(list(texts))
        return normalize_rows(vectors), truncated

    # -- images ---------------------------------------------------------------------------
    def prepare_images(self, images: Sequence[bytes]) -> list[PreparedSample]:
        """Decoded as the table's recorded mode decodes; a row that cannot be decoded (not
        an image, too many pixels) keeps its status and error, as the pipeline records."""
        rows = [prepare(RawSample(key=str(i), source_member="", image_bytes=data), self.decode)
                for i, data in enumerate(images)]  # fmt: skip
        finish_on_device(rows, self.decode, str(self.encoder.device))
        return rows

    def encode_prepared(self, rows: Sequence[PreparedSample]) -> np.ndarray:
        """L2-normalised float32 vectors of rows :meth:`prepare_images` decoded (ok ones)."""
        if any(r.raw.status != OK or r.pixels is None for r in rows):
            raise ValueError("encode_prepared takes decoded rows only")
        if not rows:
            return np.zeros((0, self.loaded.embed_dim), np.float32)
        import torch

        first = rows[0].pixels
        if isinstance(first, torch.Tensor):
            pixels = torch.stack([r.pixels for r in rows])
        else:
            pixels = np.stack([r.pixels for r in rows])
        return normalize_rows(self.encoder.encode_images(pixels))
