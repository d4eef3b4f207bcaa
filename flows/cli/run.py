"""``clipbatch run``: the embedding flow on real data, from flags or ``--config run.yaml``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, get_args

from clipbatch_flows.params import CONFIG_PATHS

from clipbatch.config import (
    EmbedConfig,
    EmbeddingDtype,
    Precision,
    PreprocessMode,
    SourceKind,
    build_config,
    load_config,
)
from clipbatch.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (EmbedConfig); flags override it")
    p.add_argument(
        "--source", help="dataset URL, e.g. s3://bucket/laion/ or 's3://b/{00000..00099}.tar'"
    )
    p.add_argument("--dest", help="output URL for the Parquet table")
    p.add_argument("--source-kind", choices=get_args(SourceKind))
    p.add_argument(
        "--model",
        help="ViT-B/32 (or openai:ViT-B/32), tiny, an OpenAI checkpoint path or s3:// URI, "
        "open_clip:ARCH:TAG (e.g. open_clip:ViT-H-14:laion2b_s32b_b79k), "
        "open_clip:local-dir:URL, open_clip:hf-hub:ORG/REPO, hf:ORG/NAME[@REVISION], hf:PATH",
    )
    p.add_argument("--checkpoint-sha256", help="expected checkpoint sha256")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--precision", choices=get_args(Precision))
    p.add_argument(
        "--batch-size",
        type=lambda v: v if v == "auto" else int(v),
        help="images per forward pass, or 'auto': the largest that fits on the GPU",
    )
    p.add_argument(
        "--devices",
        help="several devices, one worker process each: 'all' or e.g. cuda:0,cuda:1",
    )
    p.add_argument("--shard-concurrency", type=int, help="shards encoded at once")
    p.add_argument("--decode-workers", type=int)
    p.add_argument(
        "--task-runner",
        help="where shard tasks run: threads (default, this process), dask://host:8786 "
        "(an existing Dask scheduler) or ray://host:10001",
    )
    p.add_argument(
        "--gpus-per-shard",
        type=float,
        help="GPU slots each shard task claims on Dask (workers started with "
        "--resources GPU=1) or Ray (num_gpus)",
    )
    p.add_argument(
        "--preprocess",
        choices=get_args(PreprocessMode),
        help="exact (default): bit-identical to the model's own transform; fast: JPEG draft "
        "decoding + SIMD resize on the CPU; gpu: JPEGs decoded batched on the GPU (nvJPEG)",
    )
    p.add_argument("--dtype", choices=get_args(EmbeddingDtype), help="embedding storage dtype")
    p.add_argument("--max-error-ratio", type=float)
    p.add_argument(
        "--overwrite", action="store_true", default=None, help="redo shards even if done"
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        default=None,
        help="fetch again the rows of committed shards whose images failed transiently "
        "(fetch_transient), and only those; the rest is carried over, not re-encoded",
    )
    p.add_argument("--endpoint-url", help="S3-compatible endpoint for source, sink and model")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config field by dotted path, e.g. --set runtime.max_image_pixels=50000000",
    )
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> EmbedConfig:
    overrides: dict[str, Any] = {path: getattr(args, name) for name, path in CONFIG_PATHS.items()}
    overrides.update(
        {
            "runtime.batch_size": None if args.batch_size == "auto" else args.batch_size,
            "runtime.auto_batch_size": True if args.batch_size == "auto" else None,
            "runtime.devices": args.devices.split(",") if args.devices else None,
        }
    )
    if args.endpoint_url:
        for part in ("source", "sink", "model"):
            overrides[f"{part}.storage.endpoint_url"] = args.endpoint_url
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except ValueError:
            overrides[key] = value
    if args.config:
        return load_config(args.config, overrides)
    if not args.source or not args.dest:
        raise ConfigError("give --source and --dest, or --config run.yaml")
    return build_config({}, overrides)


def run(args: argparse.Namespace) -> int:
    from clipbatch.plan.preflight import preflight

    config = config_from_args(args)
    preflight(config)  # a typo costs a second and a line, before any server or model starts
    from clipbatch_flows.cli.execute import execute, print_summary

    # Rows are counted where they are encoded: on a Dask/Ray cluster that is another process,
    # so a local bar would sit at zero.
    local = config.runtime.task_runner in (None, "threads")
    progress = local and not args.no_progress and sys.stderr.isatty()
    summary, error = execute(config, progress=progress, verbose=args.verbose)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    if error:
        print(f"clipbatch: {error}", file=sys.stderr)
        return 1
    return 0
