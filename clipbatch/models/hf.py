"""Hugging Face transformers (the ``[hf]`` extra): CLIPModel and SiglipModel checkpoints.

- ``hf:ORG/NAME[@REVISION]``: downloaded with ``huggingface_hub.snapshot_download`` into
  its cache (config, tokenizer, processor and safetensors weights; ``.bin`` only when the
  repo has no safetensors); the commit is recorded as the revision.
- ``hf:PATH_OR_URL``: a ``save_pretrained`` folder, local or in object storage (fetched
  into clipbatch's cache first).

SigLIP 2's fixed-resolution checkpoints are SiglipModel checkpoints and load here. The
NaFlex variant (``Siglip2Model``: variable patch counts with ``pixel_attention_mask``) is
refused with a clear error.

The preprocessing is the image processor's (size, shortest edge or squash, centre crop
placed as transformers places it, resample, mean, std), as data; ``exact`` mode also uses
the processor's resampler: PIL for PIL-backed processors, torch's uint8 antialiased kernel
for torchvision-backed ones (transformers 5's default). Text uses the folder's tokenizer:
CLIP pads to the batch's longest caption (its tower is causal and pools at the first EOS,
so padding is inert; proven in tests/models/test_hf.py), SigLIP pads to the full context
(64) with ``padding="max_length"``, as its model card does, because it pools the last
position.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from clipbatch.config import ModelConfig
from clipbatch.errors import ConfigError
from clipbatch.models.base import ModelBackend, ResolvedCheckpoint, TokenBatch, features
from clipbatch.models.extras import install_hint, require
from clipbatch.models.files import combined_sha256, config_sha256, local_folder
from clipbatch.models.names import FOLDER, HUB, ModelName
from clipbatch.preprocess.resize import ImagePreprocess, channel_values

log = logging.getLogger(__name__)

FAMILY = "hf"
SUPPORTED = {"clip": "CLIPModel", "siglip": "SiglipModel"}
# Config, processor and tokenizer files, and the weights transformers itself loads (not the
# fp16/flax/onnx variants or open_clip's copy many repos carry as well).
_HUB_FILES = ["*.json", "*.txt", "*.model", "*.spm", "*.vocab"]
_HUB_SAFETENSORS = ["model.safetensors", "model-*-of-*.safetensors"]
_HUB_PICKLES = ["pytorch_model.bin", "pytorch_model-*-of-*.bin"]
_HUB_SKIP = ["open_clip_*"]
_WEIGHTS = (
    ("model.safetensors", "model.safetensors.index.json"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json"),
)
_RESAMPLE = {2: "bilinear", 3: "bicubic", "bilinear": "bilinear", "bicubic": "bicubic"}


def resolve(name: ModelName, cfg: ModelConfig) -> ResolvedCheckpoint:
    require(FAMILY, name.canonical)
    if name.form == HUB:
        folder = _download(name)
        revision = folder.name if folder.parent.name == "snapshots" else name.revision
        source, arch = f"hf:{name.value}", name.value
    elif name.form == FOLDER:
        folder = local_folder(name.value, cfg.storage, f"model {name.canonical!r}")
        revision, source, arch = None, name.value, None
    else:
        raise AssertionError(name.form)
    config = _read_config(folder, name)
    model_type = config.get("model_type")
    _require_tokenizer_backend(folder, name)
    weights = weight_files(folder)
    if not weights:
        raise ConfigError(
            f"model {name.canonical!r}: no weights in {name.value} "
            "(model.safetensors, sharded *.safetensors, or pytorch_model.bin)"
        )
    return ResolvedCheckpoint(
        load_arg=str(folder),
        sha256=combined_sha256(folder, weights),
        display_name=name.canonical,
        family=FAMILY,
        arch=arch or SUPPORTED[model_type],
        revision=revision,
        config_sha256=config_sha256(folder),
        context_length=_text_context(config),
        source=source,
        options={"model_type": model_type, "safetensors": weights[0].suffix == ".safetensors"},
    )


def _download(name: ModelName) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # Safetensors first; an older repo has PyTorch pickles only.
        for weights in (_HUB_SAFETENSORS, _HUB_PICKLES):
            folder = Path(
                snapshot_download(
                    name.value,
                    revision=name.revision,
                    allow_patterns=[*_HUB_FILES, *weights],
                    ignore_patterns=_HUB_SKIP,
                )
            )
            if weight_files(folder):
                break
    except Exception as e:  # noqa: BLE001 - any hub failure is a configuration problem here
        raise ConfigError(
            f"model {name.canonical!r}: could not fetch it from the Hugging Face hub ({e}); "
            "downloads need network access (HF_HUB_OFFLINE=1 allows only cached files), and "
            "a folder is written hf:./path or hf:/path"
        ) from e
    return folder


def _read_config(folder: Path, name: ModelName) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"model {name.canonical!r}: {name.value} has no readable config.json "
            f"(a transformers save_pretrained folder): {e}"
        ) from e
    model_type = config.get("model_type")
    if model_type == "siglip2":
        raise ConfigError(
            f"model {name.canonical!r} is a SigLIP 2 NaFlex checkpoint (Siglip2Model: variable "
            "patch counts with pixel_attention_mask), which clipbatch does not run. The "
            "fixed-resolution SigLIP 2 checkpoints (e.g. hf:google/siglip2-base-patch16-224) "
            "load as SiglipModel, and open_clip has their configs (open_clip:ViT-B-16-SigLIP2:webli)"
        )
    if model_type not in SUPPORTED:
        raise ConfigError(
            f"model {name.canonical!r}: transformers model type {model_type!r} is not supported; "
            f"clipbatch runs {', '.join(SUPPORTED.values())} checkpoints"
        )
    return config


def _require_tokenizer_backend(folder: Path, name: ModelName) -> None:
    """A SentencePiece tokenizer without a fast ``tokenizer.json`` (SigLIP's) needs
    sentencepiece and protobuf: say so now, at planning, not in the first shard."""
    if any(folder.glob("*.model")) and not (folder / "tokenizer.json").is_file():
        require(FAMILY, name.canonical, "sentencepiece")
        require(FAMILY, name.canonical, "google.protobuf")


def _text_context(config: dict[str, Any]) -> int:
    text = config.get("text_config") or {}
    default = 77 if config.get("model_type") == "clip" else 64
    return int(text.get("max_position_embeddings") or default)


def weight_files(folder: Path) -> list[Path]:
    """The weights transformers loads, in its order: ``model.safetensors`` or the shards its
    index names, else ``pytorch_model.bin`` or its shards. Empty when there are none."""
    for single, index in _WEIGHTS:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                shards = json.loads((folder / index).read_text())["weight_map"].values()
            except (OSError, ValueError, KeyError, AttributeError):
                continue
            files = [folder / shard for shard in sorted(set(shards))]
            if files and all(f.is_file() for f in files):
                return files
    return []


def load(checkpoint: ResolvedCheckpoint, device: str, dtype: torch.dtype) -> HFBackend:
    transformers = require(FAMILY, checkpoint.display_name)
    folder = checkpoint.load_arg
    model_type = checkpoint.options.get("model_type")
    model_cls = getattr(transformers, SUPPORTED[model_type])
    try:
        processor = transformers.AutoProcessor.from_pretrained(folder)
    except ImportError as e:  # e.g. sentencepiece or protobuf for SigLIP's tokenizer
        raise ConfigError(
            f"model {checkpoint.display_name!r}: its tokenizer or processor needs a package "
            f"that is missing ({e}); install it with: {install_hint(FAMILY)}"
        ) from e
    model = model_cls.from_pretrained(
        folder, use_safetensors=bool(checkpoint.options.get("safetensors"))
    )
    model = model.half() if dtype == torch.float16 else model.float()  # bf16: autocast
    return HFBackend(model.to(device).eval(), processor, checkpoint.context_length or 77)


class HFBackend(ModelBackend):
    family = FAMILY

    def __init__(self, model: torch.nn.Module, processor: Any, context_length: int) -> None:
        super().__init__(model)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # A fast tokenizer sets truncation/padding on its Rust object per call, and two
        # threads at once fail ("Already borrowed"): shards encoded concurrently share it.
        self._tokenizer_lock = threading.Lock()
        self.model_type = model.config.model_type
        self._context = context_length
        self._image = image_preprocess(processor.image_processor)
        self._dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        if self.model_type == "clip":
            image_dim = model.visual_projection.out_features
            self._embed_dim = model.text_projection.out_features
        else:
            image_dim = model.config.vision_config.hidden_size
            self._embed_dim = model.text_model.head.out_features
        if image_dim != self._embed_dim:
            raise ConfigError(
                f"image ({image_dim}) and text ({self._embed_dim}) embeddings differ in size"
            )

    @property
    def image(self) -> ImagePreprocess:
        return self._image

    @property
    def reference_preprocess(self) -> Callable[[Any], torch.Tensor]:
        def preprocess(img: Any) -> torch.Tensor:
            return self.processor(images=img, return_tensors="pt")["pixel_values"][0]

        return preprocess

    @property
    def context_length(self) -> int:
        return self._context

    @property
    def embed_dim(self) -> int:
        return int(self._embed_dim)

    @property
    def tokenizer_name(self) -> str:
        return f"transformers.{type(self.tokenizer).__name__}"

    @property
    def trims_text(self) -> bool:
        # CLIP's text tower is causal and pools at the first EOS; SigLIP's is bidirectional
        # and pools the last position, so its padding is part of the input.
        return self.model_type == "clip"

    def tokenize(self, captions: Sequence[str], max_tokens: int) -> tuple[TokenBatch, list[bool]]:
        captions = list(captions)
        if not captions:
            return TokenBatch(torch.zeros(0, 2, dtype=torch.long)), []
        with self._tokenizer_lock:
            return self._tokenize(captions, max_tokens)

    def _tokenize(self, captions: list[str], max_tokens: int) -> tuple[TokenBatch, list[bool]]:
        tok = self.tokenizer
        lengths = tok(captions, truncation=False, verbose=False)["input_ids"]
        truncated = [len(ids) > max_tokens for ids in lengths]
        if self.trims_text or max_tokens == self._context:
            out = tok(
                captions,
                padding=self.text_padding,
                truncation=True,
                max_length=max_tokens,
                return_tensors="pt",
            )
        else:  # fewer tokens than the context, still padded to it as the model expects
            ids = tok(captions, truncation=True, max_length=max_tokens)
            out = tok.pad(ids, padding="max_length", max_length=self._context, return_tensors="pt")
        mask = out.get("attention_mask")
        return TokenBatch(out["input_ids"], mask), truncated

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return features(self.model.get_image_features(pixel_values=pixels.to(self._dtype)))

    def encode_text(self, tokens: TokenBatch) -> torch.Tensor:  # type: ignore[override]
        return features(self.model.get_text_features(**tokens.inputs()))


def image_preprocess(ip: Any) -> ImagePreprocess:
    """A transformers CLIP/SigLIP image processor's settings, as data."""
    name = type(ip).__name__
    backend = getattr(ip, "backend", None) or ("torchvision" if name.endswith("Fast") else "pil")
    resampler = "torch" if backend == "torchvision" else "pil"
    resample = getattr(ip, "resample", 3)
    interpolation = _RESAMPLE.get(getattr(resample, "value", resample))
    if interpolation is None:
        raise ConfigError(f"{name}: resample {resample!r} is not supported (bicubic, bilinear)")
    if not getattr(ip, "do_resize", True):
        raise ConfigError(f"{name}: do_resize=False gives images of any size; not supported")
    if getattr(ip, "do_pad", False):
        raise ConfigError(f"{name}: do_pad is not supported")
    if getattr(ip, "do_rescale", True) and abs(float(ip.rescale_factor) - 1 / 255) > 1e-9:
        raise ConfigError(f"{name}: rescale_factor {ip.rescale_factor} is not 1/255")
    if getattr(ip, "do_normalize", True):
        mean, std = channel_values(ip.image_mean), channel_values(ip.image_std)
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if not getattr(ip, "do_rescale", True):
        # The reference normalises 0..255 values; ours are scaled to 0..1 first.
        mean = (mean[0] / 255, mean[1] / 255, mean[2] / 255)
        std = (std[0] / 255, std[1] / 255, std[2] / 255)
    size = ip.size
    shortest = _get(size, "shortest_edge")
    crop = bool(getattr(ip, "do_center_crop", False))
    crop_size = _get_hw(getattr(ip, "crop_size", None)) if crop else None
    common = dict(
        interpolation=interpolation, mean=mean, std=std, crop_rounding="floor", resampler=resampler
    )
    if shortest and not _get(size, "longest_edge"):
        if crop_size is None:
            raise ConfigError(
                f"{name}: a shortest-edge resize without a centre crop is not supported"
            )
        return ImagePreprocess(
            size=crop_size, resize_mode="shortest", shortest_edge=int(shortest), **common
        )
    squash = _get_hw(size)
    if squash is None:
        raise ConfigError(f"{name}: size {size!r} is not supported (shortest_edge or height/width)")
    if crop_size is not None and crop_size != squash:
        return ImagePreprocess(
            size=crop_size, resize_mode="squash", squash_size=squash, crop=True, **common
        )
    return ImagePreprocess(size=squash, resize_mode="squash", crop=False, **common)


def _get(size: Any, key: str) -> Any:
    if size is None:
        return None
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _get_hw(size: Any) -> tuple[int, int] | None:
    height, width = _get(size, "height"), _get(size, "width")
    if height and width:
        return int(height), int(width)
    return None
