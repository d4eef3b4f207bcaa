"""A head: a small network that scores a row from its embedding alone (no image decoded).

A head says what it reads (the image or the text vector, of which width, L2-normalised
or not) and which models' vectors it was trained on; it refuses a table written by
another model (:meth:`Head.check_table`), because the same width does not mean the same
space. Its identity, for lineage and for binding scores to it, is its weights' sha256.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from clipbatch.errors import ConfigError

log = logging.getLogger(__name__)

COLUMNS = {"image": "image_embedding", "text": "text_embedding"}


class HeadMismatchError(ConfigError):
    """The table's vectors are not the ones the head reads (another model or width)."""


@dataclass(frozen=True)
class HeadSpec:
    """What a head reads, and which models' vectors it accepts."""

    name: str
    input: str = "image"  # image | text
    embed_dim: int = 768
    # Models it was trained on: clipbatch model names (ViT-L/14, open_clip:ViT-L-14:openai,
    # hf:openai/clip-vit-large-patch14, ...) and/or checkpoint sha256s; both empty: any
    # model of the right width (a user's head that says nothing more).
    models: tuple[str, ...] = ()
    checkpoints: tuple[str, ...] = ()
    normalize_input: bool = True
    description: str = ""

    @property
    def column(self) -> str:
        return COLUMNS[self.input]


@dataclass
class Head:
    """A loaded head: its spec, its torch module, and where its weights came from."""

    spec: HeadSpec
    module: torch.nn.Module
    sha256: str
    source: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    def identity(self) -> dict[str, Any]:
        """What lineage records of the head."""
        return {"name": self.name, "sha256": self.sha256, "source": self.source, **self.extra}

    def check_table(self, model: dict[str, Any]) -> None:
        """Refuse a table whose model (its files' ``model`` metadata) is not the head's."""
        dim = int(model.get("embed_dim") or 0)
        if dim != self.spec.embed_dim:
            raise HeadMismatchError(
                f"head {self.name!r} reads {self.spec.embed_dim}-wide {self.spec.input} "
                f"vectors; the table's model {model.get('name')!r} writes {dim}"
            )
        if not (self.spec.models or self.spec.checkpoints):
            return
        name = str(model.get("name") or "")
        if name in self.spec.models or model.get("checkpoint_sha256") in self.spec.checkpoints:
            return
        wanted = ", ".join(self.spec.models) or "its training model"
        raise HeadMismatchError(
            f"head {self.name!r} was trained on the vectors of {wanted}; the table was written "
            f"by {name!r} (sha256 {str(model.get('checkpoint_sha256'))[:12]}…), whose vectors "
            "it would score as noise"
        )

    def score(self, vectors: np.ndarray, batch: int = 65_536) -> np.ndarray:
        """float32 scores of ``vectors`` ([n, D]), one per row."""
        out = np.empty(len(vectors), np.float32)
        self.module.eval()
        with torch.inference_mode():
            for start in range(0, len(vectors), batch):
                x = torch.from_numpy(
                    np.ascontiguousarray(vectors[start : start + batch], np.float32)
                )
                if self.spec.normalize_input:
                    x = torch.nn.functional.normalize(x, dim=1)
                out[start : start + len(x)] = self.module(x).reshape(-1).numpy()
        return out


def mlp(
    dims: Sequence[int], activation: str = "relu", output: str = "identity"
) -> torch.nn.Sequential:
    """Linear layers ``dims[0] -> dims[1] -> ... -> dims[-1]``, the activation between them,
    and ``output`` (identity or sigmoid) at the end: a user's head."""
    acts = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "tanh": torch.nn.Tanh}
    if activation not in acts:
        raise ConfigError(f"activation {activation!r}: one of {', '.join(acts)}")
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(acts[activation]())
    if output == "sigmoid":
        layers.append(torch.nn.Sigmoid())
    elif output != "identity":
        raise ConfigError(f"output {output!r}: identity or sigmoid")
    return torch.nn.Sequential(*layers)
