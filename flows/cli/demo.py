"""``clipbatch demo``: write a synthetic img2dataset-style WebDataset, embed it, show it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipbatch.config import RuntimeConfig, build_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dir", default="clipbatch-demo", help="working folder (default ./clipbatch-demo)"
    )
    p.add_argument("--shards", type=int, default=3, help="number of tar shards")
    p.add_argument("--per-shard", type=int, default=64, help="images per shard")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from clipbatch_flows.cli.execute import execute, print_summary

    from clipbatch.models.openai import TINY_CHECKPOINT
    from clipbatch.plan.preflight import check_device
    from clipbatch.synthetic import write_webdataset

    check_device(RuntimeConfig(device=args.device))
    root = Path(args.dir).resolve()
    data, dest = root / "data", root / "embeddings"
    write_webdataset(data, shards=args.shards, per_shard=args.per_shard, seed=0)
    print(f"dataset:    {data} ({args.shards} shards x {args.per_shard} captioned JPEGs)")
    if not TINY_CHECKPOINT.is_file():
        print(
            "model:      built-in 'tiny' CLIP, RANDOMLY INITIALISED (no trained checkpoint ships yet):\n"
            "            the pipeline is real, the vectors carry no meaning"
        )
    else:
        print(
            f"model:      built-in 'tiny' CLIP trained on synthetic shapes ({TINY_CHECKPOINT.name})"
        )
    config = build_config(
        {
            "source": {"url": str(data), "kind": "webdataset"},
            "sink": {"url": str(dest)},
            "model": {"name": "tiny"},
            "runtime": {"device": args.device, "batch_size": args.batch_size},
        }
    )
    progress = not args.no_progress and sys.stderr.isatty()
    summary, error = execute(config, progress=progress, verbose=args.verbose)
    print_summary(summary)
    print(
        'read back:  python -c "import duckdb; print(duckdb.sql(\\"select key, caption, status, '
        f"similarity from '{dest}/*.parquet' limit 5\\\"))\""
    )
    if error:
        print(f"clipbatch: {error}", file=sys.stderr)
        return 1
    show_queries(str(dest), args.device)
    return 0


DEMO_QUERIES = ("a red circle", "a large blue square", "a yellow star on the left")


def show_queries(dest: str, device: str) -> None:
    """Answer a few text queries from the output table alone, so a person can judge it."""
    from clipbatch.query.search import search
    from clipbatch.tables.table import open_table

    device = "cpu" if device == "auto" else device
    print("\nsearch:     text -> image, from the Parquet table alone (top 3, cosine)")
    for hits in search(open_table(dest), list(DEMO_QUERIES), k=3, device=device):
        print(f"  {hits[0].query!r}" if hits else "")
        for hit in hits:
            print(f"    {hit.score:+.3f}  {hit.key}  {hit.caption}")
    print(f'more:       clipbatch search "a green triangle" --table {dest}')
