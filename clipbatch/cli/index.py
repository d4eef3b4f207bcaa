"""``clipbatch index ROOT``: build or update the kNN indexes of a table's vectors.

ROOT is one table or a partition root of nightly ``date=…/`` tables; the index covers
every table under it and lives in ``ROOT/_knn/{image,text}/``. A second run adds only
the files that are new since the last build (or rebuilds, by the policy in
:mod:`clipbatch.knn.build`).
"""

from __future__ import annotations

import argparse

from clipbatch.cli.common import add_storage_arguments, storage_options
from clipbatch.knn.names import INDEX_COLUMNS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="the table or partition root (local path, s3://...)")
    p.add_argument(
        "--name",
        action="append",
        choices=list(INDEX_COLUMNS),
        help="which vectors to index (repeatable; default both, text when the rows have it)",
    )
    p.add_argument(
        "--factory",
        default="auto",
        help="FAISS index factory, e.g. 'IVF4096,Flat' or 'HNSW32' (default auto: by size)",
    )
    p.add_argument("--nprobe", type=int, help="IVF lists searched per query (default nlist/16)")
    p.add_argument(
        "--rebuild", action="store_true", help="build from scratch, not an incremental update"
    )
    add_storage_arguments(p)


def run(args: argparse.Namespace) -> int:
    from clipbatch.knn.build import build_indexes
    from clipbatch.knn.policy import IndexSettings

    settings = IndexSettings(factory=args.factory, nprobe=args.nprobe, rebuild=args.rebuild)
    storage = storage_options(args)
    for report in build_indexes(args.root, args.name, settings, storage):
        where = f"{args.root.rstrip('/')}/_knn/{report.name}"
        if report.mode == "skipped":
            print(f"{where}: skipped ({'; '.join(report.reasons)})")
        elif report.mode == "current":
            print(f"{where}: current ({report.vectors:,} vectors, {report.files} files)")
        else:
            why = f" ({', '.join(report.reasons)})" if report.reasons else ""
            print(
                f"{where}: {report.mode} {report.factory}, {report.vectors:,} vectors "
                f"(+{report.added:,} -{report.removed:,}) from {report.files} files "
                f"in {report.seconds:.1f} s{why}"
            )
    return 0
