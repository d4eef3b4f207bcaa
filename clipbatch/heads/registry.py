"""Which heads clipbatch can name, and loading a head from a name, a file or a config.

    aesthetic-laion-v2                 LAION's aesthetic predictor, downloaded once (sha256 pinned)
    aesthetic-laion-v2=PATH            the same head from a local copy of its weights
    nsfw-laion-b32=PATH.safetensors    LAION's NSFW detectors, converted once from Keras
    nsfw-laion-l14=PATH.safetensors    (python -m clipbatch.heads.convert_keras)
    PATH/my-head.json                  a user's head: a linear layer or an MLP (safetensors)

A user's head is a JSON config beside its weights::

    {"name": "my-quality", "input": "image", "embed_dim": 512, "layers": [512, 64, 1],
     "activation": "relu", "output": "sigmoid", "normalize_input": true,
     "weights": "my-quality.safetensors",
     "models": ["ViT-B/32"], "checkpoints": []}

whose safetensors hold a ``torch.nn.Sequential`` of ``torch.nn.Linear`` layers with the
activation between them (keys ``0.weight``, ``0.bias``, ``2.weight``, ...):
:func:`clipbatch.heads.base.mlp` builds it. ``models``/``checkpoints`` name the models
whose vectors it reads (empty: any model of that width).

Example::

    from clipbatch.heads.registry import load_head

    head = load_head("aesthetic-laion-v2")          # downloads on first use
    scores = head.score(vectors)                    # float32, one per row
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from clipbatch.errors import ConfigError
from clipbatch.heads.base import Head, HeadSpec, mlp
from clipbatch.heads.laion import (
    NSFWB32,
    NSFWL14,
    OPENAI_VIT_B32,
    OPENAI_VIT_L14,
    VIT_B32_NAMES,
    VIT_L14_NAMES,
    AestheticMLP,
)
from clipbatch.io.storage import file_digests

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedHead:
    spec: HeadSpec
    build: Callable[[], torch.nn.Module]
    url: str
    sha256: str | None  # of the published file; None: not pinnable (converted locally)
    converted: bool = False  # published in another framework: convert once, then load


NAMED: dict[str, NamedHead] = {
    "aesthetic-laion-v2": NamedHead(
        HeadSpec(
            "aesthetic-laion-v2", "image", 768, VIT_L14_NAMES, (OPENAI_VIT_L14,),
            description="LAION's improved aesthetic predictor (about 1 to 10)",
        ),
        AestheticMLP,
        "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
        "sac%2Blogos%2Bava1-l14-linearMSE.pth",
        "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0",
    ),
    "nsfw-laion-b32": NamedHead(
        HeadSpec(
            "nsfw-laion-b32", "image", 512, VIT_B32_NAMES, (OPENAI_VIT_B32,),
            description="LAION's CLIP-based NSFW detector for ViT-B/32 (probability)",
        ),
        NSFWB32,
        "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/"
        "clip_autokeras_nsfw_b32.zip",
        None,
        converted=True,
    ),
    "nsfw-laion-l14": NamedHead(
        HeadSpec(
            "nsfw-laion-l14", "image", 768, VIT_L14_NAMES, (OPENAI_VIT_L14,),
            description="LAION's CLIP-based NSFW detector for ViT-L/14 (probability)",
        ),
        NSFWL14,
        "https://raw.githubusercontent.com/LAION-AI/CLIP-based-NSFW-Detector/main/"
        "clip_autokeras_binary_nsfw.zip",
        None,
        converted=True,
    ),
}  # fmt: skip


def list_heads() -> list[str]:
    """The heads clipbatch can name (each also takes =PATH to local weights).

    Example::

        from clipbatch.heads.registry import list_heads

        list_heads()  # ['aesthetic-laion-v2', 'nsfw-laion-b32', 'nsfw-laion-l14']
    """
    return sorted(NAMED)


def load_head(ref: str) -> Head:
    """A head from ``name``, ``name=PATH`` or a user head's ``PATH.json``.

    Example::

        from clipbatch.heads.registry import load_head

        head = load_head("aesthetic-laion-v2")                     # downloaded once, sha256 pinned
        head = load_head("nsfw-laion-l14=nsfw-l14.safetensors")    # converted once from Keras
        head = load_head("heads/my-quality.json")                  # a user's head
        scores = head.score(vectors)                                # float32, one per row
    """
    name, sep, path = ref.partition("=")
    if name in NAMED:
        return _named(NAMED[name], Path(path) if sep else None)
    if ref.endswith(".json"):
        return _custom(Path(ref))
    raise ConfigError(
        f"unknown head {ref!r}: one of {', '.join(list_heads())} (optionally =PATH to its "
        "weights), or a user head's PATH.json"
    )


def _named(named: NamedHead, path: Path | None) -> Head:
    spec = named.spec
    if path is None:
        if named.converted:
            raise ConfigError(
                f"head {spec.name!r} is published as a Keras model; convert it once with "
                f"`python -m clipbatch.heads.convert_keras {spec.name} OUT.safetensors` "
                f"(needs tensorflow and autokeras, there only), then use {spec.name}=OUT.safetensors"
            )
        path = _download(named)
    if not path.is_file():
        raise ConfigError(f"head {spec.name!r}: no file {str(path)!r}")
    (sha,) = file_digests(path)
    if named.sha256 and sha != named.sha256 and not named.converted:
        log.warning(
            "head %s: %s has sha256 %s, not the published %s; scores are bound to this file",
            spec.name, path, sha[:12], named.sha256[:12],
        )  # fmt: skip
    module = named.build()
    _load_weights(module, path, spec.name)
    return Head(spec, module, sha, str(path))


def _download(named: NamedHead) -> Path:
    """The published weights, fetched once into clipbatch's cache, checked by sha256."""
    from clipbatch.models.files import cache_dir

    target = cache_dir() / "heads" / f"{named.spec.name}-{(named.sha256 or 'x')[:16]}.pth"
    if target.is_file():
        return target
    import urllib.request

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".part")
    log.info("downloading head %s from %s", named.spec.name, named.url)
    with urllib.request.urlopen(named.url, timeout=60) as response, tmp.open("wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    (sha,) = file_digests(tmp)
    if named.sha256 and sha != named.sha256:
        tmp.unlink()
        raise ConfigError(
            f"head {named.spec.name!r}: the download from {named.url} has sha256 {sha}, "
            f"expected {named.sha256}; not used"
        )
    tmp.replace(target)
    return target


def _load_weights(module: torch.nn.Module, path: Path, name: str) -> None:
    """A safetensors file or a torch state dict (weights only: no code is unpickled)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"head {name!r}: {path} does not hold its weights: {e}") from e
    module.eval()


def _custom(config_path: Path) -> Head:
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"head config {str(config_path)!r}: {e}") from e
    try:
        spec = HeadSpec(
            name=str(config["name"]),
            input=str(config.get("input", "image")),
            embed_dim=int(config["embed_dim"]),
            models=tuple(config.get("models") or ()),
            checkpoints=tuple(config.get("checkpoints") or ()),
            normalize_input=bool(config.get("normalize_input", True)),
            description=str(config.get("description", "")),
        )
        dims = [int(d) for d in config["layers"]]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(
            f"head config {str(config_path)!r}: {e!r} (see clipbatch.heads.registry)"
        ) from e
    if spec.input not in ("image", "text"):
        raise ConfigError(f"head {spec.name!r}: input must be image or text")
    if dims[0] != spec.embed_dim or dims[-1] != 1:
        raise ConfigError(
            f"head {spec.name!r}: layers must go from embed_dim {spec.embed_dim} to 1"
        )
    if spec.name in NAMED:
        raise ConfigError(f"head {spec.name!r}: that name is a published head's; choose another")
    weights = config_path.parent / config.get(
        "weights", config_path.with_suffix(".safetensors").name
    )
    module = mlp(dims, config.get("activation", "relu"), config.get("output", "identity"))
    _load_weights(module, weights, spec.name)
    (sha,) = file_digests(weights)
    return Head(spec, module, sha, str(weights), extra={"config": config_path.name})
