"""GPU checks in one go (``python -m bench --gpu`` or ``bash bench/gpu.sh``), about 5-10 minutes.

Also measures bigger shapes users run, random weights from configs (``FAMILY_SHAPES``):
OpenAI ViT-L/14, open_clip ViT-H-14 and a SigLIP-SO400M/14@384 (transformers), each
behind its family's clipbatch backend: stock images/s and captions/s against clipbatch's
encoder path (``--no-shapes`` skips them).

Checks the issue's GPU targets with a random ViT-B/32 in fp16 and prints PASS/FAIL:
- encode-only images/s (ready tensors, the model's limit) >= 15,000;
- text captions/s (LAION-like captions, trimmed to the batch's longest) >= 30,000;
- end-to-end images/s from local WebDataset shards (read, decode, resize, encode both
  towers, write Parquet, commit) >= 5,000, the best of the three preprocessing modes
  (gpu: nvJPEG decode on the card; fast; exact).
Writes bench/RESULTS-gpu.md and bench/results-gpu.json (also under $OUT when set),
and exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from bench.common import siglip_config, siglip_tokenizer

TARGETS = {"encode_only": 15_000.0, "text": 30_000.0, "end_to_end": 5_000.0}
CAPTIONS = [
    "a small red circle on the left of a striped blue background",
    "photo of a dog",
    "Vintage poster of the 1960s, Paris, Eiffel tower at night with lights",
    "A woman sitting at a wooden table with a cup of coffee and a laptop",
]


def _write_shards(path: Path, shards: int, per_shard: int, size: int) -> Path:
    from clipbatch.synthetic import write_webdataset

    if (path / f"{shards - 1:05d}.tar").is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        part = path / f"part{i}"
        write_webdataset(part, shards=1, per_shard=per_shard, seed=100 + i, size=size)
        os.replace(part / "00000.tar", path / f"{i:05d}.tar")
        part.rmdir()

    # Threads suffice: the rendering is numpy and PIL, which release the GIL.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 4) as pool:
        list(pool.map(one, range(shards)))
    return path


def _timed(fn: Any, items: int, seconds: float) -> float:
    torch.cuda.synchronize()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        reps += 1
    torch.cuda.synchronize()
    return reps * items / (time.perf_counter() - start)


def model_limits(model: torch.nn.Module, batch: int) -> dict[str, float]:
    import clip

    from clipbatch.models.openai import encode_text_trimmed

    images = torch.randn(batch, 3, 224, 224, device="cuda", dtype=torch.float16)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    tokens77 = clip.tokenize(captions).cuda()
    width = int((tokens77 != 0).sum(1).max())
    tokens = tokens77[:, :width].contiguous()
    with torch.inference_mode():
        for _ in range(3):  # warm-up: cuDNN autotuning, allocator
            model.encode_image(images)
            encode_text_trimmed(model, tokens)
        return {
            "encode_only": _timed(lambda: model.encode_image(images), batch, 5.0),
            "text": _timed(lambda: encode_text_trimmed(model, tokens), batch, 5.0),
            "text_stock_77": _timed(lambda: model.encode_text(tokens77), batch, 3.0),
            "pairs_stock": _timed(
                lambda: (model.encode_image(images), model.encode_text(tokens77)), batch, 3.0
            ),
        }


def gpu_decode_fidelity(model: torch.nn.Module, count: int = 32) -> dict[str, float]:
    """Cosine of ViT-B/32 embeddings from nvJPEG decode + float resize to the reference's."""
    from clip.clip import _transform

    from bench.common import cosines, jpegs, pil
    from clipbatch.preprocess.device import decode_jpegs_on_device
    from clipbatch.preprocess.resize import CLIP_MEAN, CLIP_STD

    data = jpegs(count // 2, 512, 384, seed=5) + jpegs(count - count // 2, 1024, 700, seed=6)
    reference = torch.stack([_transform(224)(pil(d)) for d in data]).cuda()
    decoded = decode_jpegs_on_device(data, 224, "cuda", lambda i: None)
    if any(not isinstance(t, torch.Tensor) for t in decoded):
        raise RuntimeError("nvJPEG refused a plain baseline JPEG")
    mean = torch.tensor(CLIP_MEAN, device="cuda").view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device="cuda").view(1, 3, 1, 1)
    ours = (torch.stack(decoded).float() / 255 - mean) / std
    with torch.inference_mode():
        ref_emb = model.encode_image(reference.half()).float().cpu().numpy()
        our_emb = model.encode_image(ours.half()).float().cpu().numpy()
    c = cosines(our_emb, ref_emb)
    return {"gpu_decode_min_cos": float(c.min()), "gpu_decode_mean_cos": float(c.mean())}


# Bigger shapes users run, random weights, configs only (nothing is downloaded).
FAMILY_SHAPES: dict[str, dict[str, Any]] = {
    "ViT-L/14 (OpenAI clip)": {
        "family": "openai",
        "batch": 256,
        "arch": dict(
            embed_dim=768,
            image_resolution=224,
            vision_layers=24,
            vision_width=1024,
            vision_patch_size=14,
            context_length=77,
            vocab_size=49408,
            transformer_width=768,
            transformer_heads=12,
            transformer_layers=12,
        ),
    },
    "ViT-H-14 (open_clip)": {"family": "open_clip", "batch": 256, "config": "ViT-H-14"},
    "SigLIP-SO400M/14@384 (transformers)": {
        "family": "hf",
        "batch": 128,
        "siglip": siglip_config(1152, 4304, 27, 16, image_size=384, patch_size=14),
    },
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rate_on(device: str, fn: Any, items: int, seconds: float) -> float:
    _sync(device)
    reps, start = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - start < seconds:
        fn()
        reps += 1
    _sync(device)
    return reps * items / (time.perf_counter() - start)


def build_shape(spec: dict[str, Any], device: str) -> Any:
    """A random model of ``spec``'s shape behind its family's clipbatch backend (fp16 on CUDA)."""
    from clipbatch.models.loading import LoadedModel, ResolvedCheckpoint

    half = device.startswith("cuda")
    family = spec["family"]
    with torch.device(device):  # initialise on the device: seconds, not minutes, for 1B params
        torch.manual_seed(0)
        if family == "openai":
            import clip.model

            from clipbatch.models.openai import OpenAIBackend

            model = clip.model.CLIP(**spec["arch"])
            if half:
                clip.model.convert_weights(model)
            backend = OpenAIBackend(model.eval())
        elif family == "open_clip":
            import open_clip
            from open_clip.transform import PreprocessCfg, image_transform_v2

            from clipbatch.models.openclip import OpenClipBackend

            cfg = open_clip.get_model_config(spec["config"])
            for part, values in spec.get("override", {}).items():
                cfg[part].update(values)
            model = open_clip.model.CLIP(**cfg)
            if half:
                open_clip.model.convert_weights_to_lp(model, torch.float16)
            pre = open_clip.get_model_preprocess_cfg(model)
            transform = image_transform_v2(PreprocessCfg(**pre), is_train=False)
            tokenizer = open_clip.get_tokenizer(spec["config"])  # clip's BPE: offline
            backend = OpenClipBackend(model.eval(), transform, tokenizer, cfg["embed_dim"])
        else:
            from transformers import SiglipConfig, SiglipModel

            from clipbatch.models.hf import HFBackend

            model = SiglipModel(SiglipConfig(**spec["siglip"]))
            model = (model.half() if half else model).eval()
            backend = HFBackend(model, _siglip_processor(spec), 64)
    dtype = torch.float16 if half else torch.float32
    checkpoint = ResolvedCheckpoint("random", "0" * 64, "random", family=family)
    return LoadedModel(model, backend.reference_preprocess, checkpoint, device, dtype, backend)


def _siglip_processor(spec: dict[str, Any]) -> Any:
    """A SigLIP processor at the shape's size, with a SentencePiece tokenizer trained here."""
    import tempfile

    from transformers import SiglipImageProcessor, SiglipProcessor

    size = spec["siglip"]["vision_config"]["image_size"]
    prefix = Path(tempfile.mkdtemp()) / "spm"
    tokenizer = siglip_tokenizer(prefix, CAPTIONS * 50, vocab_size=150)
    return SiglipProcessor(
        image_processor=SiglipImageProcessor(size={"height": size, "width": size}),
        tokenizer=tokenizer,
    )


def family_shape_limits(
    name: str, spec: dict[str, Any], device: str = "cuda", seconds: float = 3.0
) -> dict[str, Any]:
    """Per shape: the stock calls' images/s and captions/s (full context), and clipbatch's
    encoder path on the same batch (uint8 pixels normalised on the device; the family's own
    tokens, trimmed where that is exact)."""
    from clipbatch.encode.encoder import ClipEncoder

    loaded = build_shape(spec, device)
    backend, batch = loaded.backend, spec["batch"]
    enc = ClipEncoder(loaded, batch_size=batch)
    height, width = backend.image.size
    dtype = loaded.dtype
    images = torch.randn(batch, 3, height, width, device=device, dtype=dtype)
    pixels = torch.randint(0, 256, (batch, height, width, 3), dtype=torch.uint8, device=device)
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    ours_tokens, _ = enc.tokenize(captions)
    ours_tokens = ours_tokens.to(device)
    if backend.family == "hf":
        full = backend.processor(
            text=captions, padding="max_length", truncation=True, return_tensors="pt"
        ).to(device)

        def stock_image() -> Any:
            return loaded.model.get_image_features(pixel_values=images)

        def stock_text() -> Any:
            return loaded.model.get_text_features(**full)
    else:
        import clip

        full = clip.tokenize(captions, truncate=True).to(device)

        def stock_image() -> Any:
            return loaded.model.encode_image(images)

        def stock_text() -> Any:
            return loaded.model.encode_text(full)

    out: dict[str, Any] = {"shape": name, "family": backend.family, "batch": batch}
    with torch.inference_mode():
        for _ in range(2):  # warm-up: cuDNN autotuning, allocator
            stock_image(), stock_text()
            backend.encode_text(ours_tokens)
        out["stock_images"] = _rate_on(device, stock_image, batch, seconds)
        out["stock_text_full_context"] = _rate_on(device, stock_text, batch, seconds)
        out["clipbatch_text"] = _rate_on(
            device, lambda: backend.encode_text(ours_tokens), batch, seconds
        )
    out["clipbatch_images"] = _rate_on(device, lambda: enc.encode_images(pixels), batch, seconds)
    out["text_tokens"] = int(ours_tokens.shape[1])
    return out


def end_to_end(
    ckpt: str, src: Path, dest: Path, batch: int, preprocess: str, device: str = "cuda"
) -> dict[str, Any]:
    from clipbatch.config import build_config
    from clipbatch.pipeline.shard import process_shard
    from clipbatch.pipeline.worker import shard_context
    from clipbatch.plan.planner import plan_shards

    config = build_config(
        {
            "source": {"url": str(src)},
            "sink": {"url": str(dest), "overwrite": True},
            "model": ckpt,
            "runtime": {
                "device": device,
                "precision": "fp16" if device == "cuda" else "fp32",
                "batch_size": batch,
                "preprocess": preprocess,
                "decode_workers": os.cpu_count() or 8,
            },
        }
    )
    plan = plan_shards(config)
    ctx = shard_context(config, uuid.uuid4().hex)
    process_shard(plan.shards[0], ctx, plan.fingerprints[plan.shards[0].name])  # warm-up
    start = time.perf_counter()
    # Two shards at a time, as shard_concurrency=2 would: one drains while the next fills.
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(
            pool.map(lambda s: process_shard(s, ctx, plan.fingerprints[s.name]), plan.shards[1:])
        )
    seconds = time.perf_counter() - start
    rows = sum(r.rows for r in results)
    return {"images_per_s": rows / seconds, "rows": rows, "seconds": seconds}


def shape_lines(shapes: list[dict[str, Any]]) -> list[str]:
    """The family shapes as a markdown table (random weights, fp16)."""
    if not shapes:
        return []
    lines = [
        "",
        "Bigger shapes (random weights, fp16): stock calls vs clipbatch's encoder path.",
        "",
        "| shape | batch | stock images/s | clipbatch images/s | stock text/s (full context) "
        "| clipbatch text/s (tokens) |",
        "|---|---|---|---|---|---|",
    ]
    for s in shapes:
        if "error" in s:
            lines.append(f"| {s['shape']} | failed: {s['error']} | | | | |")
            continue
        lines.append(
            f"| {s['shape']} | {s['batch']} | {s['stock_images']:,.0f} | "
            f"{s['clipbatch_images']:,.0f} | {s['stock_text_full_context']:,.0f} | "
            f"{s['clipbatch_text']:,.0f} ({s['text_tokens']}) |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench --gpu")
    parser.add_argument("--shards", type=int, default=9, help="shards (the first is warm-up)")
    parser.add_argument("--per-shard", type=int, default=4000)
    parser.add_argument("--size", type=int, default=320, help="JPEG side in pixels")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument(
        "--no-shapes",
        dest="shapes",
        action="store_false",
        help="skip the ViT-L/14, ViT-H-14 and SigLIP-SO400M shapes",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("FAIL: no CUDA device visible; run this on a GPU machine")
        return 2
    import clip.model

    from bench.common import VIT_B32, vit_b32_checkpoint, work_dir

    card = torch.cuda.get_device_name(0)
    print(f"device: {card}, torch {torch.__version__}, {os.cpu_count()} CPU cores", flush=True)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    model = clip.model.CLIP(**VIT_B32)
    clip.model.convert_weights(model)  # fp16 weights, as clip.load makes them on CUDA
    model = model.cuda().eval()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "card": card,
        "cpu_cores": os.cpu_count(),
        "model": "random ViT-B/32",
        "precision": "fp16",
        "batch": args.batch,
    }
    results.update(model_limits(model, args.batch))
    try:  # one failing section must not cost the others' figures
        results.update(gpu_decode_fidelity(model))
    except Exception as e:  # noqa: BLE001 - reported in the table
        results["gpu_decode_error"] = f"{type(e).__name__}: {e}"
        print(f"nvJPEG fidelity check failed: {results['gpu_decode_error']}", flush=True)
    print(json.dumps(results, indent=1), flush=True)
    del model
    torch.cuda.empty_cache()
    shapes: list[dict[str, Any]] = []
    for name, spec in FAMILY_SHAPES.items() if args.shapes else ():
        try:  # each shape on its own: one failing must not cost the others
            shapes.append(family_shape_limits(name, spec))
        except Exception as e:  # noqa: BLE001 - reported in the table
            shapes.append({"shape": name, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(shapes[-1]), flush=True)
        torch.cuda.empty_cache()  # the shape's model is gone with its function's frame
    results["family_shapes"] = shapes
    t0 = time.perf_counter()
    src = _write_shards(
        work_dir() / f"gpu-{args.shards}x{args.per_shard}-{args.size}",
        args.shards,
        args.per_shard,
        args.size,
    )
    print(f"shards ready in {time.perf_counter() - t0:.0f}s", flush=True)
    ckpt = vit_b32_checkpoint()
    torch.cuda.reset_peak_memory_stats()
    modes = ("gpu", "fast", "exact")
    for mode in modes:
        try:
            e2e = end_to_end(ckpt, src, work_dir() / f"gpu-out-{mode}", args.batch, mode)
        except Exception as e:  # noqa: BLE001 - reported; the other modes still run
            results[f"end_to_end_{mode}"] = 0.0
            results[f"end_to_end_{mode}_error"] = f"{type(e).__name__}: {e}"
            print(f"end-to-end ({mode}) failed: {e}", flush=True)
            continue
        results[f"end_to_end_{mode}"] = e2e["images_per_s"]
        results[f"end_to_end_{mode}_rows"] = e2e["rows"]
        print(f"end-to-end ({mode}): {e2e}", flush=True)
    results["end_to_end"] = max(results[f"end_to_end_{m}"] for m in modes)
    results["efficiency"] = results["end_to_end"] / results["encode_only"]
    results["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    import resource

    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ok = True
    lines = [
        f"## GPU checks ({results['date']}, {card}, {os.cpu_count()} CPU cores)",
        "",
        "| check | measured | target | result |",
        "|---|---|---|---|",
    ]
    for key, target in TARGETS.items():
        passed = results[key] >= target
        ok &= passed
        lines.append(
            f"| {key} | {results[key]:,.0f}/s | {target:,.0f}/s | {'PASS' if passed else 'FAIL'} |"
        )
        print(f"{'PASS' if passed else 'FAIL'}: {key} {results[key]:,.0f}/s (target {target:,.0f})")
    lines += [
        "",
        f"Random ViT-B/32, fp16, batch {args.batch}; stock pairs/s {results['pairs_stock']:,.0f}, "
        f"stock 77-token text {results['text_stock_77']:,.0f}/s; end-to-end exact "
        f"{results['end_to_end_exact']:,.0f}/s, fast {results['end_to_end_fast']:,.0f}/s, "
        f"gpu (nvJPEG) {results['end_to_end_gpu']:,.0f}/s; efficiency "
        f"{results['efficiency']:.2f}; nvJPEG path fidelity (cosine to the reference "
        f"preprocessing, 32 images) min {results.get('gpu_decode_min_cos', float('nan')):.6f}, "
        f"mean {results.get('gpu_decode_mean_cos', float('nan')):.6f} "
        f"({args.shards - 1} x {args.per_shard} JPEGs of {args.size} px, local shards); "
        f"peak GPU memory {results['peak_gpu_mib']:,.0f} MiB, peak RSS "
        f"{results['peak_rss_mib']:,.0f} MiB.",
    ]
    errors = {k: v for k, v in results.items() if k.endswith("_error")}
    lines += [f"- {k}: {v}" for k, v in errors.items()]
    lines += shape_lines(results.get("family_shapes", []))
    text = "\n".join(lines) + "\n"
    print(text)
    here = Path(__file__).parent
    for folder in [here, Path(os.environ["OUT"])] if os.environ.get("OUT") else [here]:
        (folder / "RESULTS-gpu.md").write_text(text)
        (folder / "results-gpu.json").write_text(json.dumps(results, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
