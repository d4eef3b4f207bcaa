"""Tiny random models of every family, built with each library's own constructors and saved in
its own format, plus offline tokenizers: nothing here downloads anything.

- OpenAI: ``clip.model.CLIP`` state dict (what ``clip.load`` reads).
- open_clip: ``open_clip_config.json`` (model_cfg + preprocess_cfg) and weights, the
  ``local-dir:`` layout; a CLIP-shaped model with clip's BPE (shipped in the package),
  and a SigLIP-shaped one (bidirectional text, 'last' pooling, an HF tokenizer in the
  folder).
- transformers: ``save_pretrained`` folders for CLIPModel (CLIPTokenizer from clip's BPE
  file) and SiglipModel (a SentencePiece model trained here, saved as a SiglipTokenizer),
  and a NaFlex Siglip2Model (which clipbatch refuses).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clipbatch.synthetic import COLOURS, SHAPES, jpeg_bytes, random_spec, render

N_PX = 32
CAPTIONS = [
    "a red circle",
    "a small blue square on the left of a striped white background",
    "Hello, World! A LARGE green triangle...",
    "",
    "many words " * 60,  # longer than every context: truncated
]
# Landscape, portrait, odd margins (crop rounding), square, a big one (JPEG draft in fast).
IMAGE_SIZES = [(97, 64), (64, 131), (45, 45), (333, 250), (81, 120), (640, 480)]

OPEN_CLIP_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": N_PX, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# Preprocessing variants open_clip models ship with (OpenAI's, DFN/ImageNet's, SigLIP's).
OPEN_CLIP_PREPROCESS: dict[str, dict[str, Any]] = {
    "shortest": {"resize_mode": "shortest", "interpolation": "bicubic"},
    "longest": {
        "resize_mode": "longest",
        "interpolation": "bicubic",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "fill_color": 0,
    },
    "squash": {
        "resize_mode": "squash",
        "interpolation": "bilinear",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
    },
}


def images(sizes: list[tuple[int, int]] = IMAGE_SIZES, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [jpeg_bytes(render(random_spec(rng), max(w, h), rng).resize((w, h))) for w, h in sizes]


def clip_bpe_path() -> str:
    """The CLIP BPE vocabulary that ships inside the clip package."""
    import clip.simple_tokenizer

    return os.path.join(
        os.path.dirname(clip.simple_tokenizer.__file__), "bpe_simple_vocab_16e6.txt.gz"
    )


# -- OpenAI --------------------------------------------------------------------------------

OPENAI_VIT: dict[str, Any] = dict(
    embed_dim=32,
    image_resolution=N_PX,
    vision_layers=2,
    vision_width=64,
    vision_patch_size=8,
    context_length=77,
    vocab_size=49408,
    transformer_width=64,
    transformer_heads=1,
    transformer_layers=2,
)


def write_openai_checkpoint(path: Path, seed: int = 0) -> Path:
    import clip.model

    torch.manual_seed(seed)
    model = clip.model.CLIP(**OPENAI_VIT)
    torch.save(model.state_dict(), path)
    return path


# -- open_clip -----------------------------------------------------------------------------


def write_open_clip_dir(
    folder: Path, preprocess: str = "shortest", seed: int = 0, weights: str = "safetensors"
) -> Path:
    """A CLIP-shaped open_clip model in open_clip's folder layout."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**OPEN_CLIP_CLIP_CFG)
    pre = {"size": N_PX, **OPEN_CLIP_PREPROCESS[preprocess]}
    _write_open_clip(folder, model, OPEN_CLIP_CLIP_CFG, pre, weights)
    return folder


def write_open_clip_siglip_dir(folder: Path, seed: int = 0) -> Path:
    """A SigLIP-shaped open_clip model: bidirectional text pooled at the last token, padded to
    64 by an HF tokenizer saved in the folder (open_clip's local-dir tokenizer source)."""
    import open_clip

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = siglip_tokenizer(folder / "_spm" / "spm")
    tokenizer.save_pretrained(folder)
    _remove_tree(folder / "_spm")
    cfg = {
        "embed_dim": 32,
        "init_logit_bias": -10,
        "custom_text": True,
        "vision_cfg": {
            "image_size": N_PX,
            "layers": 2,
            "width": 32,
            "head_width": 16,
            "patch_size": 8,
        },
        "text_cfg": {
            "context_length": 64,
            "vocab_size": len(tokenizer),
            "hf_tokenizer_name": "local",
            "tokenizer_kwargs": {"clean": "canonicalize"},
            "width": 32,
            "heads": 2,
            "layers": 2,
            "no_causal_mask": True,
            "proj_bias": True,
            "pool_type": "last",
            "norm_kwargs": {"eps": 1e-6},
        },
    }
    torch.manual_seed(seed)
    model = open_clip.model.CustomTextCLIP(**{k: v for k, v in cfg.items() if k != "custom_text"})
    pre = {"size": N_PX, **OPEN_CLIP_PREPROCESS["squash"]}
    _write_open_clip(folder, model, cfg, pre, "bin")
    return folder


def _write_open_clip(
    folder: Path, model: torch.nn.Module, cfg: dict, pre: dict, weights: str
) -> None:
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}, indent=1)
    )
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        from safetensors.torch import save_file

        save_file(state, str(folder / "open_clip_model.safetensors"))
    else:
        torch.save(state, folder / "open_clip_pytorch_model.bin")


# -- tokenizers ----------------------------------------------------------------------------


def spm_corpus() -> list[str]:
    rng = random.Random(0)
    words = [
        *COLOURS,
        *SHAPES,
        "a",
        "the",
        "small",
        "large",
        "on",
        "left",
        "right",
        "of",
        "background",
    ]
    lines = [" ".join(rng.choice(words) for _ in range(8)) for _ in range(300)]
    return [*lines, *CAPTIONS[:3], "Hello World punctuation, digits 0123456789"]


def siglip_tokenizer(prefix: Path) -> Any:
    """A SiglipTokenizer over a SentencePiece model trained here (SigLIP's ids: pad = eos = 1)."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    prefix.parent.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(spm_corpus()),
        model_prefix=str(prefix),
        vocab_size=120,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return SiglipTokenizer(vocab_file=f"{prefix}.model", model_max_length=64)


def clip_tokenizer(folder: Path) -> Any:
    """transformers' CLIPTokenizer from clip's own BPE merges (as openai/clip-* ship it)."""
    import clip.simple_tokenizer as st
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    with gzip.open(clip_bpe_path()) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(st.bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)


# -- transformers --------------------------------------------------------------------------

_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
_SIGLIP_IDS = dict(pad_token_id=1, eos_token_id=1, bos_token_id=None)  # the tokenizer's


def write_hf_clip_dir(folder: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer(folder / "_tok")
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, **_TOWER),
        vision_config=dict(image_size=N_PX, patch_size=8, **_TOWER),
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    # Shortest edge above the crop, as some CLIP checkpoints ship (256 -> 224).
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": N_PX + 8}, crop_size={"height": N_PX, "width": N_PX}
        ),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _remove_tree(folder / "_tok")
    return folder


def write_hf_siglip_dir(folder: Path, seed: int = 0) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    tokenizer = siglip_tokenizer(folder / "_spm" / "spm")
    config = SiglipConfig(
        text_config=dict(
            vocab_size=len(tokenizer), max_position_embeddings=64, **_SIGLIP_IDS, **_TOWER
        ),
        vision_config=dict(image_size=N_PX, patch_size=8, **_TOWER),
    )
    torch.manual_seed(seed)
    model = SiglipModel(config).eval()
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": N_PX, "width": N_PX}),
        tokenizer=tokenizer,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _remove_tree(folder / "_spm")
    return folder


def write_hf_siglip2_naflex_dir(folder: Path) -> Path:
    from transformers import Siglip2Config, Siglip2Model

    config = Siglip2Config(
        text_config=dict(vocab_size=64, max_position_embeddings=64, **_SIGLIP_IDS, **_TOWER),
        vision_config=dict(patch_size=8, num_patches=16, **_TOWER),
    )
    torch.manual_seed(0)
    Siglip2Model(config).save_pretrained(folder)
    return folder


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# -- comparisons ---------------------------------------------------------------------------


def cosines(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def pil_images(data: list[bytes]) -> list[Any]:
    from PIL import Image

    return [Image.open(io.BytesIO(d)) for d in data]
