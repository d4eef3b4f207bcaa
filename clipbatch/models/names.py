"""Model names: one grammar for the CLI, YAML and the Prefect form.

    tiny | ViT-B/32 | ./ckpt.pt | s3://b/ckpt.pt      OpenAI format, as before
    openai:<any of the above>                          the same model, prefixed
    open_clip:ARCH:TAG                                 open_clip built-in, pretrained tag
    open_clip:local-dir:PATH_OR_URL                    open_clip folder (open_clip_config.json)
    open_clip:hf-hub:ORG/REPO                          open_clip's own hub form
    hf:ORG/NAME[@REVISION]                             transformers, from the hub
    hf:PATH_OR_URL                                     transformers save_pretrained folder

After ``open_clip:``, ``local-dir:`` and ``hf-hub:`` are schemes; anything else is
``ARCH:TAG``, neither part holding a colon, and the tag is required (open_clip's own
default takes the last tag listed, which has changed under users' feet). After ``hf:``,
a value with a URL scheme (``s3://``) or starting with ``/``, ``./`` or ``../`` is a
folder; anything else is a hub id. A bare name with a colon that is not a URL is read as
a prefix, so a typo such as ``openclip:`` fails with a message instead of becoming a path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from clipbatch.errors import ConfigError
from clipbatch.io.storage import has_scheme

OPENAI, OPEN_CLIP, HF = "openai", "open_clip", "hf"
FAMILIES = (OPENAI, OPEN_CLIP, HF)
TINY = "tiny"
# OpenAI's released checkpoints, by the names clip.load takes (clip.available_models();
# a test holds the two together). Known without importing clip, which imports torch.
OPENAI_MODELS = (
    "RN50",
    "RN101",
    "RN50x4",
    "RN50x16",
    "RN50x64",
    "ViT-B/32",
    "ViT-B/16",
    "ViT-L/14",
    "ViT-L/14@336px",
)

_PREFIX = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*):")
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./+-]*$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]*$")
_SIMILAR = {
    "openclip": "open_clip:",
    "open-clip": "open_clip:",
    "openclip_torch": "open_clip:",
    "hf_clip": "hf:",
    "hf-clip": "hf:",
    "huggingface": "hf:",
    "hf-hub": "open_clip:hf-hub: (open_clip) or hf: (transformers)",
    "local-dir": "open_clip:local-dir:",
}

GRAMMAR = (
    "model names: tiny, ViT-B/32 (a clip name), a checkpoint path or object-store URI, "
    "openai:<any of those>, open_clip:ARCH:TAG, open_clip:local-dir:PATH_OR_URL, "
    "open_clip:hf-hub:ORG/REPO, hf:ORG/NAME[@REVISION], hf:PATH_OR_URL "
    "(a folder path starts with /, ./ or ../)"
)

# Forms of each family.
BUILTIN = "builtin"  # openai: tiny, a clip model name or a local file (told apart later)
FILE = "file"  # openai: a checkpoint URI (file:// or object storage)
ARCH_TAG = "arch_tag"  # open_clip: ARCH:TAG
LOCAL_DIR = "local_dir"  # open_clip: a folder, local or in object storage
HUB = "hub"  # open_clip hf-hub: or hf: hub id
FOLDER = "folder"  # hf: a save_pretrained folder, local or in object storage


@dataclass(frozen=True)
class ModelName:
    """A parsed model name.

    ``value`` is what the form names: a clip name, a path or URL, or a hub repo id;
    ``canonical`` is the name as tables record it (``openai:`` is dropped, so
    ``openai:ViT-B/32`` and ``ViT-B/32`` are one model).
    """

    family: str
    form: str
    value: str
    canonical: str
    arch: str | None = None
    tag: str | None = None
    revision: str | None = None


def is_folder_path(value: str) -> bool:
    """A value ``hf:`` reads as a folder: a URL, or a path starting with /, ./ or ../."""
    return has_scheme(value) or value.startswith(("/", "./", "../"))


def parse_model_name(name: str) -> ModelName:
    """Parse ``name`` by the grammar above; raises :class:`ConfigError` with what to write."""
    name = name.strip()
    if not name:
        raise ConfigError(f"empty model name; {GRAMMAR}")
    if has_scheme(name):  # s3://..., file://...: an OpenAI-format checkpoint file
        return ModelName(OPENAI, FILE, name, name)
    match = _PREFIX.match(name)
    if match is None:
        return _openai(name, name)
    prefix, rest = match.group(1), name[match.end() :]
    if prefix == OPENAI:
        if _PREFIX.match(rest) and not has_scheme(rest):
            raise ConfigError(f"model {name!r}: openai: takes a clip name, path or URI; {GRAMMAR}")
        return _openai(rest, name)
    if prefix == OPEN_CLIP:
        return _open_clip(rest, name)
    if prefix == HF:
        return _hf(rest, name)
    hint = _SIMILAR.get(prefix.lower())
    raise ConfigError(
        f"model {name!r}: unknown family prefix {prefix + ':'!r}"
        + (f" (did you mean {hint}?)" if hint else "")
        + f"; {GRAMMAR}. A local file whose name has a colon is written ./{name}"
    )


def _openai(value: str, name: str) -> ModelName:
    if not value:
        raise ConfigError(f"model {name!r}: nothing after openai:; {GRAMMAR}")
    if value == TINY:
        return ModelName(OPENAI, BUILTIN, TINY, TINY)
    if has_scheme(value):
        return ModelName(OPENAI, FILE, value, value)
    # A clip model name or a local checkpoint file: told apart when resolved, as before.
    return ModelName(OPENAI, BUILTIN, value, value)


def _open_clip(rest: str, name: str) -> ModelName:
    example = "e.g. open_clip:ViT-H-14:laion2b_s32b_b79k"
    if rest.startswith("local-dir:"):
        location = rest[len("local-dir:") :]
        if not location:
            raise ConfigError(f"model {name!r}: a folder path or URL must follow local-dir:")
        return ModelName(OPEN_CLIP, LOCAL_DIR, location, name)
    if rest.startswith("hf-hub:"):
        repo = rest[len("hf-hub:") :]
        if not _HUB_ID.match(repo):
            raise ConfigError(
                f"model {name!r}: open_clip:hf-hub: takes a hub repo ORG/REPO, "
                "e.g. open_clip:hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
            )
        return ModelName(OPEN_CLIP, HUB, repo, name, arch=f"hf-hub:{repo}")
    arch, sep, tag = rest.partition(":")
    if not arch:
        raise ConfigError(
            f"model {name!r}: an open_clip architecture must follow open_clip:, {example}"
        )
    if not sep or not tag:
        raise ConfigError(
            f"model {name!r}: open_clip needs a pretrained tag, open_clip:{arch}:TAG ({example}); "
            "clipbatch does not take open_clip's default tag, which has changed between releases"
            + _tags_hint(arch)
        )
    if ":" in tag:
        raise ConfigError(
            f"model {name!r}: open_clip:ARCH:TAG has exactly two parts and neither holds a colon; "
            "for a folder use open_clip:local-dir:PATH, for the hub open_clip:hf-hub:ORG/REPO"
        )
    for part, what in ((arch, "architecture"), (tag, "tag")):
        if not _NAME_PART.match(part):
            raise ConfigError(f"model {name!r}: {part!r} is not a valid open_clip {what}")
    return ModelName(OPEN_CLIP, ARCH_TAG, rest, name, arch=arch, tag=tag)


def _tags_hint(arch: str) -> str:
    try:
        import open_clip
    except ImportError:
        return ""
    tags = open_clip.list_pretrained_tags_by_model(arch.replace("/", "-"))
    return f"; tags for {arch}: {', '.join(tags)}" if tags else ""


def _hf(rest: str, name: str) -> ModelName:
    if not rest:
        raise ConfigError(f"model {name!r}: a hub id or folder must follow hf:; {GRAMMAR}")
    if is_folder_path(rest):
        return ModelName(HF, FOLDER, rest, name)
    repo, at, revision = rest.partition("@")
    if not _HUB_ID.match(repo) or (at and not _REVISION.match(revision)):
        raise ConfigError(
            f"model {name!r}: after hf: comes a hub id ORG/NAME or ORG/NAME@REVISION "
            "(e.g. hf:google/siglip-base-patch16-224), or a folder: a URL (s3://...) or a path "
            "starting with /, ./ or ../"
        )
    return ModelName(HF, HUB, repo, name, arch=repo, revision=revision or None)
