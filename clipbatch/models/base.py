"""The model backend interface, the resolved checkpoint, and token batches.

Every family (OpenAI ``clip``, ``open_clip``, transformers) is one module behind
:class:`ModelBackend`. A backend gives, from the model itself:

- its image preprocessing as data (:class:`~clipbatch.preprocess.resize.ImagePreprocess`) and
  its own reference transform (for tests and the bench);
- its tokenizer, with the context length and a truncation flag per caption;
- image and text encoders, and the embedding dimension.

The identity used for fingerprints and lineage (family, architecture, tag or revision,
checkpoint sha256, config hash) is known before loading, from
:class:`ResolvedCheckpoint`, so a run plans without loading any weights.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from clipbatch.preprocess.resize import ImagePreprocess


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """What a family's loader is given, and the model's identity.

    ``load_arg`` is a clip model name or a local file (OpenAI), a local folder (open_clip
    ``local-dir``, transformers), or the weights file of an open_clip ``ARCH:TAG``.
    ``sha256`` is the checkpoint's: the weights file's, or for sharded weights the sha256
    of their names and sha256s. ``config_sha256`` hashes the files that define the
    architecture, preprocessing and tokenizer of a folder-shaped model.
    """

    load_arg: str
    sha256: str
    display_name: str
    trained: bool = True
    family: str = "openai"
    arch: str | None = None
    tag: str | None = None
    revision: str | None = None
    config_sha256: str | None = None
    context_length: int | None = None  # the text context; None: OpenAI's 77, read on load
    source: str | None = None  # where it came from: hub repo, folder URL (lineage)
    options: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def fingerprint_identity(self) -> dict[str, Any] | None:
        """What, besides ``sha256``, decides this model's vectors; None for OpenAI format.

        OpenAI-format models (``tiny``, ``ViT-B/32``, local or object-store checkpoints,
        ``openai:...``) return None, so fingerprints of tables written before families
        existed are unchanged and those tables are still skipped.
        """
        if self.family == "openai":
            return None
        return {
            "family": self.family,
            "arch": self.arch,
            "tag": self.tag,
            "revision": self.revision,
            "config_sha256": self.config_sha256,
        }

    def identity(self) -> dict[str, Any]:
        """Family, architecture, tag/revision and hashes, for file metadata and lineage."""
        return {
            "family": self.family,
            "arch": self.arch,
            "tag": self.tag,
            "revision": self.revision,
            "checkpoint_sha256": self.sha256,
            "config_sha256": self.config_sha256,
            "source": self.source,
        }


@dataclass
class TokenBatch:
    """Token ids and the attention mask a transformers tokenizer returns with them.

    Behaves like the tensor the OpenAI path uses where the pipeline needs it: ``len``,
    slicing by rows, ``pin_memory`` and ``to``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def __getitem__(self, rows: slice) -> TokenBatch:
        mask = self.attention_mask
        return TokenBatch(self.input_ids[rows], None if mask is None else mask[rows])

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def pin_memory(self) -> TokenBatch:
        mask = self.attention_mask
        return TokenBatch(self.input_ids.pin_memory(), None if mask is None else mask.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenBatch:
        mask = self.attention_mask
        return TokenBatch(
            self.input_ids.to(device, non_blocking=non_blocking),
            None if mask is None else mask.to(device, non_blocking=non_blocking),
        )

    def inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a transformers text tower."""
        out = {"input_ids": self.input_ids}
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        return out


Tokens = torch.Tensor | TokenBatch


def repeat_rows(tokens: Tokens, n: int) -> Tokens:
    """One tokenised row repeated ``n`` times (batch-size probes)."""
    if isinstance(tokens, TokenBatch):
        mask = tokens.attention_mask
        return TokenBatch(
            tokens.input_ids[:1].repeat(n, 1), None if mask is None else mask[:1].repeat(n, 1)
        )
    return tokens[:1].repeat(n, 1)


class ModelBackend(ABC):
    """One loaded model of one family: preprocessing, tokenizer and encoders.

    ``encode_image`` takes pixels already normalised with ``image.mean``/``image.std``
    (NCHW float on the model's device); ``encode_text`` takes what :meth:`tokenize`
    returned, on the device. Both return unnormalised embeddings.
    """

    family: str = ""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @property
    @abstractmethod
    def image(self) -> ImagePreprocess:
        """The family's image preprocessing, read from the model."""

    @property
    @abstractmethod
    def reference_preprocess(self) -> Callable[[Any], torch.Tensor]:
        """The family's own image transform (PIL -> normalised CHW), for comparisons."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """The text tower's context: the most tokens a caption can have."""

    @property
    @abstractmethod
    def embed_dim(self) -> int: ...

    @property
    @abstractmethod
    def tokenizer_name(self) -> str:
        """What tokenises captions (for file metadata)."""

    @property
    def trims_text(self) -> bool:
        """Whether captions are encoded only up to the batch's longest (proven exact)."""
        return False

    @property
    def text_padding(self) -> str:
        """How a caption batch is padded: 'longest' when trimming, else to the context."""
        return "longest" if self.trims_text else "max_length"

    @abstractmethod
    def tokenize(self, captions: Sequence[str], max_tokens: int) -> tuple[Tokens, list[bool]]:
        """Tokens for ``captions`` truncated to ``max_tokens``, and which were truncated."""

    @abstractmethod
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def encode_text(self, tokens: Tokens) -> torch.Tensor: ...


def features(out: Any) -> torch.Tensor:
    """A transformers ``get_*_features`` result as a tensor (v4: a tensor; v5: an output)."""
    if isinstance(out, torch.Tensor):
        return out
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        raise TypeError(f"unexpected features output {type(out).__name__}")
    return pooled
