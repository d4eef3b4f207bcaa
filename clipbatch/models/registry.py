"""Which module resolves and loads each family."""

from __future__ import annotations

from types import ModuleType

from clipbatch.models.names import HF, OPEN_CLIP, OPENAI


def family_module(family: str) -> ModuleType:
    """The module for ``family`` (imported on demand: extras stay optional)."""
    if family == OPENAI:
        from clipbatch.models import openai

        return openai
    if family == OPEN_CLIP:
        from clipbatch.models import openclip

        return openclip
    if family == HF:
        from clipbatch.models import hf

        return hf
    raise ValueError(f"unknown model family {family!r}")
