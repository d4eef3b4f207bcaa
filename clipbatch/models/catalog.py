"""What models clipbatch can name, by family: ``list_models()``, as open_clip has.

Example::

    >>> from clipbatch.models.catalog import list_models
    >>> list_models("openai")[:3]
    ['tiny', 'openai:RN50', 'openai:RN101']

open_clip's pretrained weights are listed by open_clip itself (importing it imports
torch); transformers models are any ``CLIPModel`` or ``SiglipModel`` on the hub, which
cannot be listed offline, so a few well-known ones are given as examples.
"""

from __future__ import annotations

from clipbatch.errors import ConfigError
from clipbatch.models.extras import require
from clipbatch.models.names import FAMILIES, HF, OPEN_CLIP, OPENAI, OPENAI_MODELS, TINY

HF_EXAMPLES = (
    "openai/clip-vit-base-patch32",
    "openai/clip-vit-large-patch14",
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
    "google/siglip-base-patch16-224",
    "google/siglip2-base-patch16-224",
)


def list_models(family: str | None = None) -> list[str]:
    """Model names in clipbatch's grammar, for one family or all of them (open_clip's
    only when it is installed).

    Example::

        from clipbatch.models.catalog import list_models

        list_models("openai")  # ['RN50', ..., 'ViT-B/32', 'ViT-L/14', ...]
        list_models()          # every family, open_clip's when it is installed
    """
    families = [family] if family else list(FAMILIES)
    out: list[str] = []
    for name in families:
        if name == OPENAI:
            out += [TINY, *(f"openai:{m}" for m in OPENAI_MODELS)]
        elif name == OPEN_CLIP:
            try:
                open_clip = require("open_clip", "open_clip:")
            except ConfigError:  # not installed: nothing to list, unless it was asked for
                if family:
                    raise
                continue
            out += [f"open_clip:{arch}:{tag}" for arch, tag in open_clip.list_pretrained()]
        elif name == HF:
            out += [f"hf:{repo}" for repo in HF_EXAMPLES]
        else:
            raise ValueError(f"unknown family {name!r}; one of {', '.join(FAMILIES)}")
    return out
