"""The file metadata every shard file carries under ``clipbatch`` (docs/design.md §3, §6).

Model identity, preprocessing in effect, dtype, options, source and run: in the Arrow
schema from the start (pyarrow, pandas and Hugging Face datasets see it), and in the
footer with the counts at close (:class:`clipbatch.sink.writer.ShardWriter`).
"""

from __future__ import annotations

import time
from typing import Any

from clipbatch import __version__
from clipbatch.config import EmbedConfig
from clipbatch.encode.encoder import ClipEncoder
from clipbatch.models.loading import LoadedModel
from clipbatch.plan.fingerprint import output_options
from clipbatch.preprocess.resize import ImagePreprocess
from clipbatch.records import ShardSpec
from clipbatch.sink.schema import SCHEMA_VERSION

RESIZE_NOTES = {
    "exact": " (as the model family's own transform: {resampler})",
    "fast": " (torch uint8, antialiased; JPEG draft decoding at 1/2 or 1/4, >= 1.5x that size)",
    "gpu": " (plain JPEGs decoded batched on the model's device, antialiased resize there, "
    "float32 on CUDA; other images as 'fast' on the CPU)",
}
_RESAMPLERS = {"pil": "PIL", "torch": "torch uint8, antialiased"}


def describe_resize(image: ImagePreprocess, mode: str) -> str:
    """The resize step in words, e.g. 'shortest side to 224, bicubic (PIL, ...)'."""
    height, width = image.size
    if image.resize_mode == "squash":
        squash_h, squash_w = image.squash_size or image.size
        what = f"squashed to {squash_w}x{squash_h}"
    elif image.resize_mode == "longest":
        what = f"longest side to fit {width}x{height}, padded with {image.fill}"
    elif image.shortest_edge is not None:
        what = f"shortest side to {image.shortest_edge}"
    else:
        what = f"shortest side to fit {width}x{height}"
    note = RESIZE_NOTES[mode].replace("{resampler}", _RESAMPLERS[image.resampler])
    return f"{what}, {image.interpolation}{note}"


def file_metadata(
    shard: ShardSpec,
    cfg: EmbedConfig,
    loaded: LoadedModel,
    encoder: ClipEncoder,
    run_id: str,
    run_meta: dict[str, Any],
) -> dict[str, Any]:
    ckpt = loaded.checkpoint
    image = loaded.image_preprocess
    text = encoder.text_metadata()
    return {
        "package": "clipbatch",
        "package_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "model": {
            "name": ckpt.display_name,
            "checkpoint_sha256": ckpt.sha256,
            "embed_dim": loaded.embed_dim,
            "input_resolution": loaded.input_resolution,
            "context_length": encoder.context_tokens,  # the caption limit in effect
            "trained": ckpt.trained,
            **ckpt.identity(),
            "text": text,
        },
        "preprocessing": {
            "mode": cfg.runtime.preprocess,
            "resize": describe_resize(image, cfg.runtime.preprocess),
            "crop": (f"center, {image.crop_rounding}ed offsets" if image.crop else "none"),
            "mean": list(image.mean),
            "std": list(image.std),
            "size": [image.size[0], image.size[1]],
            "image": image.describe(),
            "tokenizer": text["tokenizer"],
            "max_caption_tokens": text["max_caption_tokens"],
        },
        "dtype": cfg.sink.dtype,
        "normalized": cfg.sink.normalize,
        "options": output_options(cfg, context_length=loaded.context_length),
        "source": {
            "uri": shard.uri,
            "version": shard.version,
            "kind": shard.kind,
            "sidecar": shard.sidecar_uri,
        },
        "run": {"run_id": run_id, **run_meta},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
