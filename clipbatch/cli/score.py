"""``clipbatch score ROOT --head …``: judge every row of a table root from its embeddings.

Heads score rows into ``{table}/_scores/{head}/``; ``--semdedup`` groups near-duplicate
images across the root into ``{table}/_scores/semdedup-{eps}/``. Both are incremental:
a second run judges only new and rewritten shard files.

    clipbatch score s3://bucket/emb --head aesthetic-laion-v2
    clipbatch score emb/ --head nsfw-laion-b32=nsfw-b32.safetensors --semdedup
    clipbatch score emb/ --head heads/my-quality.json --semdedup --eps 0.03
    clipbatch score --list                    # the heads clipbatch can name
"""

from __future__ import annotations

import argparse

from clipbatch.cli.common import add_storage_arguments, storage_options
from clipbatch.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", nargs="?", help="the table or partition root (local path, s3://...)")
    p.add_argument(
        "--head",
        action="append",
        dest="heads",
        default=[],
        metavar="HEAD",
        help="a head: NAME (downloaded once), NAME=PATH (local weights) or PATH.json "
        "(a user's head); repeatable",
    )
    p.add_argument("--semdedup", action="store_true", help="group near-duplicate images (SemDeDup)")
    p.add_argument(
        "--eps",
        type=float,
        default=0.05,
        help="SemDeDup: cosine distance under which images are duplicates (default 0.05)",
    )
    p.add_argument(
        "--clusters",
        type=int,
        help="SemDeDup: k-means clusters (default about one per 1,000 rows; fixed once trained)",
    )
    p.add_argument(
        "--rebuild",
        action="store_true",
        help="SemDeDup: train the clusters again and regroup every row (groups may change)",
    )
    p.add_argument("--list", action="store_true", help="list the heads clipbatch can name")
    add_storage_arguments(p)


def run(args: argparse.Namespace) -> int:
    from clipbatch.heads.registry import NAMED, list_heads

    if args.list:
        for name in list_heads():
            spec = NAMED[name].spec
            print(f"{name:<20} {spec.embed_dim:>4}-d {spec.input:<5} {spec.description}")
        return 0
    if not args.root:
        raise ConfigError("clipbatch score needs a ROOT (or --list)")
    if not args.heads and not args.semdedup:
        raise ConfigError("nothing to do: name at least one --head, or --semdedup")
    from clipbatch.heads.registry import load_head
    from clipbatch.judge.score import score_root
    from clipbatch.judge.semdedup import SemDedupSettings, semdedup_root

    storage = storage_options(args)
    settings = SemDedupSettings(eps=args.eps, clusters=args.clusters, rebuild=args.rebuild)
    if args.semdedup:
        settings.check()  # before a head is downloaded or a row read
    heads = [load_head(ref) for ref in args.heads]
    root = args.root.rstrip("/")
    if heads:
        for h in score_root(args.root, heads, storage).heads:
            print(
                f"{root}/…/_scores/{h.head}: {h.files_scored} file(s) scored "
                f"({h.rows:,} rows), {h.files_current} current, in {h.seconds:.1f} s"
            )
    if args.semdedup:
        d = semdedup_root(args.root, settings, storage)
        trained = f", {d.clusters} clusters trained" if d.trained else f", {d.clusters} clusters"
        print(
            f"{root}/…/_scores/{d.name}: {d.files_new} new file(s) ({d.rows_new:,} rows), "
            f"{d.duplicates_new:,} ranked after an earlier duplicate{trained}, in {d.seconds:.1f} s"
        )
    return 0
