"""Shared bench helpers: data, models, timers, and the in-process pipeline run."""

from __future__ import annotations

import io
import os
import random
import resource
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from clipbatch.synthetic import jpeg_bytes, random_spec, render, write_webdataset

# The shape of OpenAI's ViT-B/32: random weights, the real cost.
VIT_B32: dict[str, Any] = dict(
    embed_dim=512,
    image_resolution=224,
    vision_layers=12,
    vision_width=768,
    vision_patch_size=32,
    context_length=77,
    vocab_size=49408,
    transformer_width=512,
    transformer_heads=8,
    transformer_layers=12,
)


def siglip_config(
    width: int, mlp: int, layers: int, heads: int, image_size: int, patch_size: int
) -> dict[str, Any]:
    """A SiglipConfig's arguments for one shape: both towers alike, SigLIP's text ids
    (pad = eos = 1, no bos) and its 64-token context."""
    tower = dict(
        hidden_size=width,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
    )
    return {
        "text_config": dict(
            vocab_size=32000,
            **tower,
            max_position_embeddings=64,
            pad_token_id=1,
            eos_token_id=1,
            bos_token_id=None,
        ),
        "vision_config": dict(image_size=image_size, patch_size=patch_size, **tower),
    }


def siglip_tokenizer(prefix: Path, corpus: list[str], vocab_size: int) -> Any:
    """A SiglipTokenizer (64 tokens) over a SentencePiece model trained here on ``corpus``
    (nothing is downloaded); the model files are written at ``prefix``."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    return SiglipTokenizer(vocab_file=f"{prefix}.model", model_max_length=64)


def work_dir() -> Path:
    path = Path(os.environ.get("CLIPBATCH_BENCH_DIR", "/tmp/clipbatch-bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def vit_b32_checkpoint() -> str:
    """A seeded random ViT-B/32 checkpoint (fp16 weights, as OpenAI ships), made once."""
    path = work_dir() / "random-vit-b-32.pt"
    if not path.is_file():
        import clip.model

        torch.manual_seed(0)
        model = clip.model.CLIP(**VIT_B32)
        clip.model.convert_weights(model)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        os.replace(tmp, path)
    return str(path)


def jpegs(n: int, width: int, height: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        img = render(random_spec(rng), max(width, height), rng).resize((width, height))
        out.append(jpeg_bytes(img))
    return out


def shards(name: str, count: int, per_shard: int, size: int = 256, seed: int = 1) -> Path:
    """img2dataset-style shards under the bench dir, made once."""
    path = work_dir() / f"{name}-{count}x{per_shard}-{size}"
    if not (path / f"{count - 1:05d}.tar").is_file():
        write_webdataset(path, shards=count, per_shard=per_shard, seed=seed, size=size)
    return path


def rate(fn: Callable[[], Any], items: int, min_seconds: float = 0.0) -> float:
    """items/s for ``fn``, repeated until ``min_seconds`` have passed (at least once)."""
    reps, start = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return reps * items / elapsed


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


@dataclass
class Row:
    """One line of the speed matrix."""

    setup: str
    device: str
    model: str
    precision: str
    batch: int
    workers: int
    figures: dict[str, float | str] = field(default_factory=dict)


def run_pipeline(config_raw: dict[str, Any]) -> tuple[float, int]:
    """Encode every shard of ``config_raw`` in this process (no Prefect); (seconds, rows)."""
    from clipbatch.config import build_config
    from clipbatch.pipeline.shard import process_shard
    from clipbatch.pipeline.worker import shard_context
    from clipbatch.plan.planner import plan_shards

    plan = plan_shards(build_config(config_raw))
    assert plan.config is not None
    ctx = shard_context(plan.config, uuid.uuid4().hex)
    rows = 0
    start = time.perf_counter()
    for shard in plan.shards:
        rows += process_shard(shard, ctx, plan.fingerprints[shard.name]).rows
    return time.perf_counter() - start, rows


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
