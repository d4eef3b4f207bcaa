"""``clipbatch dedup ROOT [--threshold 0.95]``: near-duplicate pairs from the kNN index.

Writes a Parquet table of pairs (cosine, and each row's key, table, file and row),
by default ``ROOT/_knn/{image,text}/dedup-{threshold}.parquet``.
"""

from __future__ import annotations

import argparse
import sys

from clipbatch.cli.common import add_storage_arguments, storage_options
from clipbatch.knn.names import INDEX_COLUMNS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="the table or partition root with a kNN index")
    p.add_argument("--threshold", type=float, default=0.95, help="minimum cosine (default 0.95)")
    p.add_argument("--name", choices=list(INDEX_COLUMNS), default="image", help="which index")
    p.add_argument("--out", help="where to write the pairs (default under ROOT/_knn/NAME/)")
    add_storage_arguments(p)


def run(args: argparse.Namespace) -> int:
    from clipbatch.knn.dedup import near_duplicates
    from clipbatch.knn.search import index_staleness

    storage = storage_options(args)
    stale = index_staleness(args.root, args.name, storage)
    if stale is not None and stale.stale:
        print(
            f"clipbatch: warning: the index is {stale.describe()}; the pairs cover the "
            "indexed rows only (rerun `clipbatch index`)",
            file=sys.stderr,
        )
    report = near_duplicates(args.root, args.threshold, args.name, args.out, storage)
    print(
        f"{report.pairs:,} near-duplicate pairs (cosine >= {args.threshold:g}) among "
        f"{report.rows_in_pairs:,} of {report.vectors:,} rows -> {report.out}"
    )
    return 0
