"""open_clip (PyPI ``open_clip_torch``, the ``[open_clip]`` extra): LAION, DataComp, MetaCLIP,
DFN, EVA-CLIP, MobileCLIP, SigLIP and SigLIP 2 weights, the way open_clip loads them.

- ``open_clip:ARCH:TAG``: open_clip's built-in config and pretrained tag (the tag is
  required); weights downloaded by open_clip into its cache, preprocessing merged from
  the tag's config, exactly as ``create_model_from_pretrained(ARCH, pretrained=TAG)``.
- ``open_clip:local-dir:PATH_OR_URL``: a folder with ``open_clip_config.json`` and weights
  (open_clip >= 3.0's own layout); a remote folder is fetched into the cache first.
- ``open_clip:hf-hub:ORG/REPO``: open_clip's own hub form.

Weights load with safetensors where the folder has them, else ``torch.load(weights_only=
True)`` (open_clip's ``weights_only`` default, passed explicitly). Preprocessing is the
model's ``preprocess_cfg`` (size, mean, std, interpolation, resize mode, fill), as data.
Text is encoded to the batch's longest caption only for the towers where that is exact
(a causal ``CLIP`` text tower pooling at the end-of-text token with clip's BPE, whose
end-of-text id is the largest; proven in tests/models/test_open_clip.py); every other
tower (SigLIP's bidirectional ``last`` pooling, HF text towers, CoCa) gets the full
padded context.
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
from clipbatch.models.base import ModelBackend, ResolvedCheckpoint
from clipbatch.models.extras import require
from clipbatch.models.files import cached_sha256, config_sha256, local_folder
from clipbatch.models.names import ARCH_TAG, HUB, LOCAL_DIR, ModelName
from clipbatch.preprocess.resize import CLIP_MEAN, CLIP_STD, ImagePreprocess, channel_values

log = logging.getLogger(__name__)

FAMILY = "open_clip"
DEFAULT_CONTEXT = 77
CONFIG_NAME = "open_clip_config.json"


def resolve(name: ModelName, cfg: ModelConfig) -> ResolvedCheckpoint:
    open_clip = require(FAMILY, name.canonical)
    if name.form == ARCH_TAG:
        return _resolve_arch_tag(open_clip, name)
    if name.form == LOCAL_DIR:
        return _resolve_local_dir(open_clip, name, cfg)
    if name.form == HUB:
        return _resolve_hub(open_clip, name)
    raise AssertionError(name.form)


def _resolve_arch_tag(open_clip: Any, name: ModelName) -> ResolvedCheckpoint:
    assert name.arch is not None and name.tag is not None
    arch = name.arch.replace("/", "-")  # open_clip's own spelling (ViT-B/32 -> ViT-B-32)
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise ConfigError(
            f"model {name.canonical!r}: open_clip has no architecture {arch!r} "
            "(open_clip.list_models() lists them)"
        )
    pretrained_cfg = open_clip.get_pretrained_cfg(arch, name.tag)
    if not pretrained_cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ConfigError(
            f"model {name.canonical!r}: open_clip has no pretrained tag {name.tag!r} for {arch}"
            + (f"; its tags: {', '.join(tags)}" if tags else "; it has no pretrained weights")
        )
    try:
        weights = open_clip.download_pretrained(pretrained_cfg)
    except Exception as e:  # noqa: BLE001 - any download failure is a configuration problem here
        raise ConfigError(
            f"model {name.canonical!r}: open_clip could not fetch its weights ({e}); "
            "downloads need network access (HF_HUB_OFFLINE=1 allows only cached files)"
        ) from e
    if not weights:
        raise ConfigError(f"model {name.canonical!r}: open_clip names no weights for this tag")
    return ResolvedCheckpoint(
        load_arg=str(weights),
        sha256=cached_sha256(weights),
        display_name=name.canonical,
        family=FAMILY,
        arch=arch,
        tag=name.tag,
        context_length=_context(model_cfg),
        source=pretrained_cfg.get("hf_hub") or pretrained_cfg.get("url"),
        options={"model_name": arch, "pretrained": name.tag, "embed_dim": model_cfg["embed_dim"]},
    )


def _resolve_local_dir(open_clip: Any, name: ModelName, cfg: ModelConfig) -> ResolvedCheckpoint:
    folder = local_folder(name.value, cfg.storage, f"model {name.canonical!r}")
    model_cfg = _folder_model_cfg(folder, name)
    weights = _weights_in(open_clip, folder)
    if weights is None:
        raise ConfigError(
            f"model {name.canonical!r}: no weights in {name.value} (open_clip looks for "
            "open_clip_model.safetensors, open_clip_pytorch_model.bin, ...)"
        )
    return ResolvedCheckpoint(
        load_arg=str(folder),
        sha256=cached_sha256(weights),
        display_name=name.canonical,
        family=FAMILY,
        config_sha256=config_sha256(folder),
        context_length=_context(model_cfg),
        source=name.value,
        options={
            "model_name": f"local-dir:{folder}",
            "embed_dim": model_cfg["embed_dim"],
            "weights": str(weights),
        },
    )


def _resolve_hub(open_clip: Any, name: ModelName) -> ResolvedCheckpoint:
    from open_clip.pretrained import download_pretrained_from_hf

    repo = name.value
    try:
        config_path = Path(download_pretrained_from_hf(repo, filename=CONFIG_NAME))
        weights = Path(download_pretrained_from_hf(repo))
    except Exception as e:  # noqa: BLE001 - any hub failure is a configuration problem here
        raise ConfigError(
            f"model {name.canonical!r}: could not fetch it from the Hugging Face hub ({e}); "
            "downloads need network access (HF_HUB_OFFLINE=1 allows only cached files)"
        ) from e
    model_cfg = _model_cfg_from(config_path, name)
    return ResolvedCheckpoint(
        load_arg=f"hf-hub:{repo}",
        sha256=cached_sha256(weights),
        display_name=name.canonical,
        family=FAMILY,
        arch=f"hf-hub:{repo}",
        revision=_snapshot_revision(config_path),
        config_sha256=cached_sha256(config_path),
        context_length=_context(model_cfg),
        source=f"hf-hub:{repo}",
        options={"model_name": f"hf-hub:{repo}", "embed_dim": model_cfg["embed_dim"]},
    )


def _folder_model_cfg(folder: Path, name: ModelName) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(
            f"model {name.canonical!r}: {name.value} has no {CONFIG_NAME} (open_clip's folder "
            "layout: open_clip_config.json with 'model_cfg' and 'preprocess_cfg', plus weights)"
        )
    return _model_cfg_from(path, name)


def _model_cfg_from(path: Path, name: ModelName) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
        model_cfg = config["model_cfg"]
        model_cfg["embed_dim"]  # noqa: B018 - every open_clip model config has it
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"model {name.canonical!r}: {path.name} is not a valid config: {e}"
        ) from e
    return model_cfg


def _context(model_cfg: dict[str, Any]) -> int:
    return int(model_cfg.get("text_cfg", {}).get("context_length", DEFAULT_CONTEXT))


def _weights_in(open_clip: Any, folder: Path) -> Path | None:
    """The weights file open_clip itself picks in a folder (safetensors first)."""
    find = getattr(open_clip.factory, "_find_checkpoint_in_dir", None)
    if find is not None:
        found = find(folder)
        return Path(found) if found else None
    preferred = [  # open_clip 3.x's order, for a release without the helper
        "open_clip_model.safetensors",
        "open_clip_pytorch_model.safetensors",
        "open_clip_pytorch_model.bin",
        "open_clip_pytorch_model.pth",
        "model.safetensors",
        "pytorch_model.bin",
        "pytorch_model.pth",
        "model.pth",
    ]
    for filename in preferred:
        if (folder / filename).is_file():
            return folder / filename
    return None


def _snapshot_revision(path: Path) -> str | None:
    """The hub commit of a file in the Hugging Face cache (.../snapshots/<commit>/file)."""
    parts = Path(path).parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


def load(checkpoint: ResolvedCheckpoint, device: str, dtype: torch.dtype) -> OpenClipBackend:
    open_clip = require(FAMILY, checkpoint.display_name)
    opts = checkpoint.options
    precision = "fp16" if dtype == torch.float16 else "fp32"  # bf16 runs under autocast
    model_name = opts.get("model_name") or checkpoint.load_arg
    model, preprocess = open_clip.create_model_from_pretrained(
        model_name,
        pretrained=opts.get("pretrained"),
        precision=precision,
        device=device,
        weights_only=True,
    )
    tokenizer = open_clip.get_tokenizer(model_name)
    return OpenClipBackend(model.eval(), preprocess, tokenizer, int(opts["embed_dim"]))


class OpenClipBackend(ModelBackend):
    family = FAMILY

    def __init__(
        self, model: torch.nn.Module, preprocess: Any, tokenizer: Any, embed_dim: int
    ) -> None:
        super().__init__(model)
        import open_clip
        from open_clip.tokenizer import HFTokenizer, SigLipTokenizer, SimpleTokenizer

        self._preprocess = preprocess
        self._tokenizer = tokenizer
        self._embed_dim = embed_dim
        self._image = image_preprocess(open_clip.get_model_preprocess_cfg(model))
        if isinstance(tokenizer, SimpleTokenizer):
            self._pad_id = 0
        elif isinstance(tokenizer, (HFTokenizer, SigLipTokenizer)):
            self._pad_id = int(tokenizer.tokenizer.pad_token_id or 0)
        else:
            raise ConfigError(f"open_clip tokenizer {type(tokenizer).__name__} is not supported")
        self._simple = isinstance(tokenizer, SimpleTokenizer)
        # HF tokenizers fail when two threads call one at once; shards may run concurrently.
        self._tokenizer_lock = threading.Lock()
        self._trims = (
            type(model) is open_clip.model.CLIP
            and getattr(model, "attn_mask", None) is not None
            and getattr(model, "text_pool_type", None) == "argmax"
            and self._simple
            and getattr(tokenizer, "reduction_fn", None) is None
        )
        self._visual_dtype = _first_weight_dtype(model.visual)

    @property
    def image(self) -> ImagePreprocess:
        return self._image

    @property
    def reference_preprocess(self) -> Callable[[Any], torch.Tensor]:
        return self._preprocess

    @property
    def context_length(self) -> int:
        return int(self._tokenizer.context_length or DEFAULT_CONTEXT)

    @property
    def embed_dim(self) -> int:
        return self._embed_dim

    @property
    def tokenizer_name(self) -> str:
        tok = self._tokenizer
        inner = getattr(tok, "tokenizer", None)
        name = f"open_clip.tokenizer.{type(tok).__name__}"
        return f"{name} ({type(inner).__name__})" if inner is not None else name

    @property
    def trims_text(self) -> bool:
        return self._trims

    def tokenize(self, captions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, list[bool]]:
        captions = list(captions)
        if not captions:
            return torch.zeros(0, 2, dtype=torch.long), []
        with self._tokenizer_lock:
            tokens = self._tokenizer(captions, context_length=max_tokens)
            truncated = [n > max_tokens for n in self._count_tokens(captions)]
        if self._trims:
            # End-of-text has the largest id and ends every row: the longest row ends at
            # the rightmost argmax.
            width = int(tokens.argmax(dim=1).max()) + 1
            tokens = tokens[:, : max(width, 2)]
        elif max_tokens < self.context_length:
            pad = torch.full(
                (len(captions), self.context_length - max_tokens), self._pad_id, dtype=torch.long
            )
            tokens = torch.cat([tokens, pad], dim=1)
        return tokens, truncated

    def _count_tokens(self, captions: list[str]) -> list[int]:
        """Tokens per caption before truncation, special tokens included."""
        tok = self._tokenizer
        if self._simple:
            return [len(tok.encode(text)) + 2 for text in captions]
        clean = getattr(tok, "clean_fn", None)
        if clean is None:  # SigLipTokenizer cleans inline
            from open_clip.tokenizer import basic_clean, canonicalize_text

            def clean(text: str) -> str:
                return canonicalize_text(basic_clean(text))

        ids = tok.tokenizer([clean(t) for t in captions], truncation=False, verbose=False)
        return [len(x) for x in ids["input_ids"]]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self._visual_dtype))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self._trims and tokens.shape[1] < self.context_length:
            return encode_text_trimmed(self.model, tokens)
        return self.model.encode_text(tokens)


def encode_text_trimmed(model: torch.nn.Module, text: torch.Tensor) -> torch.Tensor:
    """open_clip ``CLIP.encode_text`` for tokens shorter than the context.

    The same steps with the positional embedding and the causal mask sliced to the batch's
    length. Exact because the tower is causal and pools at the end-of-text token (argmax:
    it has the largest id), so padding after it cannot change the pooled feature.
    """
    from open_clip.transformer import text_global_pool

    length = text.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(text).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, text, model.text_pool_type, eos_token_id=model.text_eos_id)
    if model.text_projection is not None:
        if isinstance(model.text_projection, torch.nn.Linear):
            x = model.text_projection(x)
        else:
            x = x @ model.text_projection
    return x


def image_preprocess(cfg: dict[str, Any]) -> ImagePreprocess:
    """open_clip's ``image_transform(is_train=False)`` for a ``preprocess_cfg``, as data."""
    size = cfg.get("size", 224)
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mean = channel_values(cfg.get("mean") or CLIP_MEAN)
    std = channel_values(cfg.get("std") or CLIP_STD)
    # 'random' is a training option; open_clip's inference transform falls back to bicubic.
    interpolation = "bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"
    mode = cfg.get("resize_mode") or "shortest"
    fill = int(cfg.get("fill_color") or 0)
    common = dict(size=(height, width), mean=mean, std=std, fill=fill, crop_rounding="round")
    if mode == "squash":
        return ImagePreprocess(
            resize_mode="squash", interpolation=interpolation, crop=False, **common
        )
    if mode == "longest":
        return ImagePreprocess(resize_mode="longest", interpolation=interpolation, **common)
    if mode != "shortest":
        raise ConfigError(f"open_clip resize_mode {mode!r} is not supported")
    if height == width:  # torchvision Resize(int) + CenterCrop
        return ImagePreprocess(
            resize_mode="shortest", shortest_edge=height, interpolation=interpolation, **common
        )
    # Non-square: ResizeKeepRatio(size) with its default (bicubic) interpolation.
    return ImagePreprocess(resize_mode="shortest", interpolation="bicubic", **common)


def _first_weight_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype of a tower's first conv or linear weight: what its input must be."""
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            return m.weight.dtype
    return torch.float32
