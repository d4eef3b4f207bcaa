"""``clipbatch search "a red circle" --table DEST [-k 5]``: text->image search over a table."""

from __future__ import annotations

import argparse

from clipbatch.config import StorageOptions


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", nargs="+", help="one or more text queries")
    p.add_argument("--table", required=True, help="the output table's URL (local path, s3://...)")
    p.add_argument("-k", type=int, default=5, help="results per query (default 5)")
    p.add_argument("--device", default="cpu", help="device for encoding the queries")
    p.add_argument(
        "--endpoint-url",
        help="S3-compatible endpoint (default: the environment, e.g. AWS_ENDPOINT_URL)",
    )


def run(args: argparse.Namespace) -> int:
    from clipbatch.query.table import open_table, search

    storage = StorageOptions(endpoint_url=args.endpoint_url)
    table = open_table(args.table, storage)
    model = table.model_metadata()
    print(
        f"table: {args.table} ({table.rows} rows); model {model['name']} "
        f"(sha256 {model['checkpoint_sha256'][:12]}…)"
    )
    for hits in search(table, args.query, k=args.k, device=args.device, storage=storage):
        print(f"\n{hits[0].query if hits else ''!r}")
        for hit in hits:
            print(f"  {hit.rank:>2}. {hit.score:+.3f}  {hit.key}  {hit.caption or ''}")
    return 0
