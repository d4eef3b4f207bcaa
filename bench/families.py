"""Model-family rows: open_clip and transformers models, on the CPU (``python -m bench.families``).

Two random models with real shapes, saved the way users get them and loaded by name:

- ``open_clip:local-dir:``: open_clip's ViT-B-32 (its own built-in config), random weights;
- ``hf:``: a SigLIP-base-shaped ``SiglipModel`` (``SiglipConfig`` with base sizes:
  768-wide, 12-layer towers, 224 px, patch 16, 64-token text), random weights, with a
  SentencePiece tokenizer trained here.

For each: encode-only (the family's stock calls on ready tensors/tokens), end to end
(the in-process pipeline over local shards: two run sizes, so start-up cancels out), and
fidelity of ``exact``, ``fast`` and ``gpu`` (torchvision's batched decoder; on the CPU
here) preprocessing to the family's own reference transform, per image.
Figures, not tests. Writes bench/results-families.json and bench/RESULTS-families.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import (
    cosines,
    jpegs,
    pil,
    rate,
    run_pipeline,
    shards,
    siglip_config,
    siglip_tokenizer,
    work_dir,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads anything

CAPTION = "a small red circle on the left of a striped blue background"
SIGLIP_BASE = siglip_config(768, 3072, 12, 12, image_size=224, patch_size=16)


def open_clip_vit_b32_dir() -> Path:
    """A random open_clip ViT-B-32 in open_clip's folder layout (fp16 safetensors), made once."""
    folder = work_dir() / "open_clip-random-vit-b-32"
    if (folder / "open_clip_model.safetensors").is_file():
        return folder
    import open_clip
    from safetensors.torch import save_file

    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = open_clip.get_model_config("ViT-B-32")
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    pre = open_clip.get_model_preprocess_cfg(model)
    (tmp / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": {**pre, "size": list(pre["size"])}})
    )
    state = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "open_clip_model.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def siglip_base_dir() -> Path:
    """A random SigLIP-base-shaped transformers folder (fp16 safetensors), made once."""
    folder = work_dir() / "hf-random-siglip-base"
    if (folder / "model.safetensors").is_file():
        return folder
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    from clipbatch.synthetic import COLOURS, SHAPES

    tmp = folder.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "_spm").mkdir(parents=True)
    words = [*COLOURS, *SHAPES, "a", "the", "small", "large", "on", "left", "of", "background"]
    rng = np.random.default_rng(0)
    corpus = [" ".join(rng.choice(words, 10)) for _ in range(500)] + [CAPTION]
    tokenizer = siglip_tokenizer(tmp / "_spm" / "spm", corpus, vocab_size=200)
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(**SIGLIP_BASE)).half().eval()
    model.save_pretrained(tmp)
    processor = SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": 224, "width": 224}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(tmp)
    shutil.rmtree(tmp / "_spm")
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def family_models() -> dict[str, str]:
    """Label -> clipbatch model name, for the two bench models."""
    return {
        "random open_clip ViT-B-32": f"open_clip:local-dir:{open_clip_vit_b32_dir()}",
        "random SigLIP-base (transformers)": f"hf:{siglip_base_dir()}",
    }


def family_encode_only(model_name: str, batch: int) -> dict[str, float]:
    """The family's stock calls on ready inputs: images/s, and pairs/s (image + text tower).

    Text is what the family's own tokenizer makes, padded the family's way (open_clip's
    tokenizers pad to the context; SigLIP pads to 64).
    """
    from clipbatch.config import ModelConfig
    from clipbatch.models.loading import load_model

    loaded = load_model(ModelConfig(name=model_name), "cpu")
    height, width = loaded.image_preprocess.size
    images = torch.randn(batch, 3, height, width)
    model = loaded.model
    if loaded.family == "open_clip":
        import open_clip

        tokens = open_clip.get_tokenizer(loaded.checkpoint.options["model_name"])([CAPTION] * batch)

        def image() -> Any:
            return model.encode_image(images)

        def text() -> Any:
            return model.encode_text(tokens)
    else:
        inputs = loaded.backend.processor(
            text=[CAPTION] * batch, padding="max_length", truncation=True, return_tensors="pt"
        )

        def image() -> Any:
            return model.get_image_features(pixel_values=images)

        def text() -> Any:
            return model.get_text_features(**inputs)

    with torch.inference_mode():
        image(), text()  # warm-up at the measured shape
        t0 = time.perf_counter()
        image()
        t1 = time.perf_counter()
        image(), text()
        t2 = time.perf_counter()
    return {"encode_only_images": batch / (t1 - t0), "encode_only_pairs": batch / (t2 - t1)}


def family_end_to_end(
    label: str, model_name: str, batch: int, per_shard: int, small: int, large: int
) -> dict[str, Any]:
    """The in-process pipeline (read, decode, resize, both towers, Parquet, commit) over local
    shards; the marginal rate between a small and a large run, and the large run's whole rate."""
    slug = "".join(c if c.isalnum() else "-" for c in label)
    src = shards(f"fam-{slug}", large, per_shard)
    sub = work_dir() / f"fam-{slug}-sub"
    shutil.rmtree(sub, ignore_errors=True)
    sub.mkdir(parents=True)
    for tar in sorted(src.glob("*.tar"))[:small]:
        shutil.copy(tar, sub / tar.name)
    out = work_dir() / "fam-out"

    def cfg(source: Path, dest: str) -> dict[str, Any]:
        return {
            "source": {"url": str(source)},
            "model": model_name,
            "runtime": {"device": "cpu", "batch_size": batch, "task_retries": 0},
            "sink": {"url": str(out / f"{slug}-{dest}"), "overwrite": True},
        }

    run_pipeline(cfg(sub, "warm"))  # loads the model, warms caches
    t_small, n_small = run_pipeline(cfg(sub, "small"))
    t_large, n_large = run_pipeline(cfg(src, "large"))
    return {
        "end_to_end_marginal": (n_large - n_small) / max(t_large - t_small, 1e-9),
        "end_to_end_whole": n_large / t_large,
        "rows": f"{n_small} / {n_large}",
    }


def family_fidelity(model_name: str, label: str, count: int) -> dict[str, Any]:
    """Cosine of our exact, fast and gpu-path image embeddings to the family's own reference
    (its own transform, then the stock image tower), per image."""
    from clipbatch.config import ModelConfig
    from clipbatch.encode.encoder import ClipEncoder
    from clipbatch.models.loading import load_model
    from clipbatch.preprocess.decode import DecodeOptions, decode_to_pixels
    from clipbatch.preprocess.device import decode_jpegs_on_device

    loaded = load_model(ModelConfig(name=model_name), "cpu")
    enc = ClipEncoder(loaded, batch_size=count)
    geometry = loaded.image_preprocess
    data = jpegs(count // 2, 512, 384, seed=5) + jpegs(count - count // 2, 1024, 700, seed=6)
    with torch.inference_mode():
        inputs = torch.stack([loaded.preprocess(pil(d)) for d in data])
        ref = loaded.backend.encode_image(inputs).float().numpy()
    res: dict[str, Any] = {"model": label, "family": loaded.family, "images": count}
    for mode in ("exact", "fast", "gpu"):
        if mode == "gpu":  # the batched device path, run by torchvision's CPU decoder here
            decoded = decode_jpegs_on_device(data, geometry.n_px, "cpu", lambda i: None, geometry)
            pixels = np.stack([np.asarray(t.permute(1, 2, 0)) for t in decoded])
        else:
            opts = DecodeOptions(geometry.n_px, mode, geometry=geometry)
            pixels = np.stack([decode_to_pixels(d, opts)[0] for d in data])
        c = cosines(enc.encode_images(pixels), ref)
        res[f"{mode}_min_cos"] = float(c.min())
        res[f"{mode}_mean_cos"] = float(c.mean())
    return res


def text_rate(model_name: str, batch: int) -> dict[str, float]:
    """Captions/s through clipbatch's text path (tokenise + encode, the family's padding)."""
    from clipbatch.config import ModelConfig
    from clipbatch.encode.encoder import ClipEncoder
    from clipbatch.models.loading import load_model

    loaded = load_model(ModelConfig(name=model_name), "cpu")
    enc = ClipEncoder(loaded, batch_size=batch)
    captions = [CAPTION] * batch
    return {"clipbatch_text": rate(lambda: enc.encode_texts(captions), batch)}


def render(results: dict[str, Any]) -> str:
    lines = [
        f"## Model families on the CPU ({results['date']}, load {results['load']})",
        "",
        "| model | encode-only images/s | encode-only pairs/s | end-to-end marginal | "
        "end-to-end whole | efficiency vs pairs |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        eff = row["end_to_end_marginal"] / row["encode_only_pairs"]
        lines.append(
            f"| {row['model']} | {row['encode_only_images']:.1f} | {row['encode_only_pairs']:.1f} "
            f"| {row['end_to_end_marginal']:.1f} | {row['end_to_end_whole']:.1f} | {eff:.2f} |"
        )
    lines += [
        "",
        "| model | family | exact min cos | fast min / mean cos | gpu path min / mean cos |",
        "|---|---|---|---|---|",
    ]
    for f in results["fidelity"]:
        lines.append(
            f"| {f['model']} | {f['family']} | {f['exact_min_cos']:.6f} | "
            f"{f['fast_min_cos']:.6f} / {f['fast_mean_cos']:.6f} | "
            f"{f['gpu_min_cos']:.6f} / {f['gpu_mean_cos']:.6f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.families", description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=16)
    parser.add_argument("--small", type=int, default=1, help="shards in the small run")
    parser.add_argument("--large", type=int, default=3, help="shards in the large run")
    parser.add_argument("--fidelity-images", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "torch": torch.__version__,
        "rows": [],
        "fidelity": [],
    }
    for label, name in family_models().items():
        row: dict[str, Any] = {"model": label, "name": name, "batch": args.batch}
        row.update(family_encode_only(name, args.batch))
        row.update(text_rate(name, args.batch))
        row.update(
            family_end_to_end(label, name, args.batch, args.per_shard, args.small, args.large)
        )
        results["rows"].append(row)
        results["fidelity"].append(family_fidelity(name, label, args.fidelity_images))
        print(json.dumps([row, results["fidelity"][-1]], indent=1), flush=True)
    block = render(results)
    print(block)
    if not args.no_write:
        here = Path(__file__).parent
        (here / "results-families.json").write_text(json.dumps(results, indent=1))
        (here / "RESULTS-families.md").write_text(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
