"""OpenAI's ``clip`` (PyPI ``clip-anytorch``): clip names, 'tiny', and OpenAI-format files.

Exactly what clipbatch did before model families existed: ``clip.load(..., jit=False)``
gives the model and its torchvision transform; the tokenizer is clip's SimpleTokenizer;
text is encoded only up to the batch's longest caption (:func:`encode_text_trimmed`,
exact because the text tower is causal and reads the end-of-text token; proven in
tests/encode/test_encoder.py).
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from clipbatch.config import ModelConfig
from clipbatch.errors import ConfigError
from clipbatch.io.storage import is_local
from clipbatch.models.base import ModelBackend, ResolvedCheckpoint
from clipbatch.models.files import cache_dir, cached_sha256, fetch_remote_checkpoint
from clipbatch.models.names import TINY, ModelName
from clipbatch.preprocess.resize import ImagePreprocess

log = logging.getLogger(__name__)

OPENAI_CONTEXT = 77
ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY_CHECKPOINT = ASSETS / "tiny-clip.pt"
# The built-in model's shape: OpenAI's CLIP with a small ModifiedResNet image tower
# (one bottleneck block per stage, width 16, 64 px input; attention-pooling heads
# width * 32 // 64 = 8) and a small text transformer (heads = width // 64 = 1), exactly as
# clip.model.build_model infers them from a state dict. At this size a CNN learns the
# synthetic scenes faster than a ViT on the CPU (measured: held-out recall@1 0.85 vs
# 0.69 for a 4-layer ViT, same steps). The vocabulary and context are clip's tokenizer's;
# the token table (49408 x transformer_width) dominates the file, so the text width stays
# 64. clipbatch/training/train_tiny.py trains this shape into assets/tiny-clip.pt; without
# that file, 'tiny' falls back to a seeded random CLIP of the same shape.
TINY_ARCH: dict[str, Any] = dict(
    embed_dim=64,
    image_resolution=64,
    vision_layers=(1, 1, 1, 1),
    vision_width=16,
    vision_patch_size=None,  # unused by the ResNet tower
    context_length=77,
    vocab_size=49408,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=3,
)


def resolve(name: ModelName, cfg: ModelConfig) -> ResolvedCheckpoint:
    """A clip name, 'tiny', a local file or an object-store file; its sha256."""
    import clip

    value = name.value
    if value == TINY:
        return _resolve_tiny()
    if value in clip.available_models():
        # clip downloads into ~/.cache/clip and verifies this sha256 itself; the hash is
        # part of the download URL, so we know it without reading 350+ MB.
        sha = clip.clip._MODELS[value].split("/")[-2]
        return ResolvedCheckpoint(
            load_arg=value, sha256=sha, display_name=value, context_length=OPENAI_CONTEXT
        )
    if is_local(value):
        path = value[len("file://") :] if value.startswith("file://") else value
        if not os.path.isfile(path):
            hint = (
                "; a model folder is open_clip:local-dir:PATH or hf:PATH"
                if os.path.isdir(path)
                else ""
            )
            raise ConfigError(
                f"model {name.canonical!r} is neither a clip model name "
                f"({', '.join(clip.available_models())}, {TINY}) nor an existing checkpoint "
                f"file{hint}"
            )
        return ResolvedCheckpoint(
            load_arg=path, sha256=cached_sha256(path), display_name=name.canonical
        )
    path = fetch_remote_checkpoint(value, cfg.storage)
    return ResolvedCheckpoint(
        load_arg=str(path), sha256=cached_sha256(path), display_name=name.canonical
    )


def _resolve_tiny() -> ResolvedCheckpoint:
    if TINY_CHECKPOINT.is_file():
        return ResolvedCheckpoint(
            load_arg=str(TINY_CHECKPOINT),
            sha256=cached_sha256(TINY_CHECKPOINT),
            display_name=TINY,
            trained=True,
            context_length=OPENAI_CONTEXT,
        )
    # Named by the architecture, so a cached file from an older TINY_ARCH is never reused.
    arch_id = hashlib.sha256(repr(sorted(TINY_ARCH.items())).encode()).hexdigest()[:12]
    path = cache_dir() / f"tiny-random-clip-{arch_id}.pt"
    if not path.is_file():
        import clip.model

        torch.manual_seed(0)
        model = clip.model.CLIP(**TINY_ARCH)
        clip.model.convert_weights(model)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
        log.info("created a randomly initialised tiny CLIP at %s", path)
    return ResolvedCheckpoint(
        load_arg=str(path),
        sha256=cached_sha256(path),
        display_name=TINY,
        trained=False,
        context_length=OPENAI_CONTEXT,
    )


def load(
    checkpoint: ResolvedCheckpoint, device: str, dtype: torch.dtype
) -> tuple[torch.nn.Module, Any]:
    """``clip.load`` without JIT: the model (fp32 unless fp16) and its own transform."""
    import clip

    try:
        with warnings.catch_warnings():
            # clip.load probes for a TorchScript archive first; torch warns about that.
            warnings.simplefilter("ignore", FutureWarning)
            model, preprocess = clip.load(checkpoint.load_arg, device=device, jit=False)
    except RuntimeError as e:
        if "not found" in str(e):
            raise ConfigError(str(e)) from e
        raise
    if dtype != torch.float16:
        # fp32 weights; bf16 runs under autocast in the encoder. fp16 keeps clip's own
        # mixed layout (fp16 linear/conv, fp32 LayerNorm), as clip.load makes it on CUDA.
        model = model.float()
    return model.eval(), preprocess


class OpenAIBackend(ModelBackend):
    """A ``clip.model.CLIP`` (or anything with its attributes, e.g. a test wrapper)."""

    family = "openai"

    def __init__(self, model: torch.nn.Module, preprocess: Any = None) -> None:
        super().__init__(model)
        self._preprocess = preprocess
        from clip.simple_tokenizer import SimpleTokenizer

        self._tokenizer = SimpleTokenizer()
        self.sot = self._tokenizer.encoder["<|startoftext|>"]
        self.eot = self._tokenizer.encoder["<|endoftext|>"]

    @property
    def image(self) -> ImagePreprocess:
        return ImagePreprocess.clip(int(self.model.visual.input_resolution))

    @property
    def reference_preprocess(self) -> Callable[[Any], torch.Tensor]:
        if self._preprocess is None:
            from clip.clip import _transform

            self._preprocess = _transform(int(self.model.visual.input_resolution))
        return self._preprocess

    @property
    def context_length(self) -> int:
        return int(self.model.context_length)

    @property
    def embed_dim(self) -> int:
        return int(self.model.text_projection.shape[1])

    @property
    def tokenizer_name(self) -> str:
        return "clip.simple_tokenizer.SimpleTokenizer (OpenAI BPE)"

    @property
    def trims_text(self) -> bool:
        return True

    def tokenize(self, captions: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, list[bool]]:
        """Tokens padded to the longest caption (<= max_tokens), and which were truncated."""
        rows, truncated = [], []
        for text in captions:
            ids = [self.sot, *self._tokenizer.encode(text), self.eot]
            if len(ids) > max_tokens:
                ids = ids[:max_tokens]
                ids[-1] = self.eot
                truncated.append(True)
            else:
                truncated.append(False)
            rows.append(ids)
        width = max((len(r) for r in rows), default=2)
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for i, ids in enumerate(rows):
            tokens[i, : len(ids)] = torch.tensor(ids)
        return tokens, truncated

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return encode_text_trimmed(self.model, tokens)


def encode_text_trimmed(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``model.encode_text`` for tokens of any length <= context, without padding to 77.

    Slices the positional embedding and the causal mask to the batch's length. Each
    residual block is run by hand with the sliced mask instead of mutating the
    block's stored 77x77 mask, so this is safe to call from several threads.
    """
    length = tokens.shape[1]
    dtype = model.dtype
    x = model.token_embedding(tokens).type(dtype)
    x = x + model.positional_embedding[:length].type(dtype)
    x = x.permute(1, 0, 2)  # NLD -> LND
    for block in model.transformer.resblocks:
        mask = block.attn_mask
        if mask is not None:
            mask = mask[:length, :length].to(dtype=x.dtype, device=x.device)
        h = block.ln_1(x)
        x = x + block.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        x = x + block.mlp(block.ln_2(x))
    x = x.permute(1, 0, 2)
    x = model.ln_final(x).type(dtype)
    # The end-of-text token has the largest id, so argmax finds its position.
    return (
        x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ model.text_projection
    )
