"""``clipbatch search "a red circle" --table ROOT [-k 5]``: text->image search.

ROOT is one table or a partition root of nightly tables. With a kNN index under it
(``clipbatch index``) the search uses the index, and says which and whether it is
current; without one it reads every row (brute force) and says so.
"""

from __future__ import annotations

import argparse
import sys

from clipbatch.cli.common import add_storage_arguments, storage_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", nargs="+", help="one or more text queries")
    p.add_argument(
        "--table", required=True, help="the table or partition root (local path, s3://...)"
    )
    p.add_argument("-k", type=int, default=5, help="results per query (default 5)")
    p.add_argument("--device", default="cpu", help="device for encoding the queries")
    p.add_argument(
        "--brute-force", action="store_true", help="read every row even when a kNN index exists"
    )
    p.add_argument("--nprobe", type=int, help="IVF lists searched per query (default: the index's)")
    add_storage_arguments(p)


def run(args: argparse.Namespace) -> int:
    from clipbatch.query.search import search_root

    storage = storage_options(args)
    hits, method = search_root(
        args.table,
        args.query,
        k=args.k,
        device=args.device,
        storage=storage,
        use_index=not args.brute_force,
        nprobe=args.nprobe,
    )
    model = method.model or {}
    sha = str(model.get("checkpoint_sha256"))[:12]
    print(f"table:  {args.table}; model {model.get('name')} (sha256 {sha}…)")
    print(f"search: {method.detail}")
    if method.stale:
        print(
            "clipbatch: warning: the kNN index is stale; new rows are missing from results "
            "(rerun `clipbatch index`, or search with --brute-force)",
            file=sys.stderr,
        )
    for query, per_query in zip(args.query, hits, strict=True):
        print(f"\n{query!r}")
        for hit in per_query:
            print(f"  {hit.rank:>2}. {hit.score:+.3f}  {hit.where}  {hit.caption or ''}")
    return 0
