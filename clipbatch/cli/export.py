"""``clipbatch export ROOT --to DIR``: a table in clip-retrieval's layout.

Writes ``DIR/img_emb/img_emb_{i}.npy``, ``DIR/text_emb/text_emb_{i}.npy`` (float16,
L2-normalised) and ``DIR/metadata/metadata_{i}.parquet``, which autofaiss,
embedding-reader and ``clip back`` read as they are; the rows that have both vectors,
from a table of any release (null or zero vectors for rows without one).
"""

from __future__ import annotations

import argparse

from clipbatch.cli.common import add_storage_arguments, storage_options

# The library's formats (clipbatch.tables.export.FORMATS; a test holds them together),
# named here so that building the parser does not import pyarrow.
FORMATS = ("clip-retrieval",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="the table or partition root (local path, s3://...)")
    p.add_argument("--to", required=True, help="the folder to write (local path, s3://...)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=FORMATS[0],
        help="the layout (default clip-retrieval: img_emb/, text_emb/, metadata/)",
    )
    p.add_argument(
        "--max-rows-per-partition",
        type=int,
        help="split a shard file's rows above this many (default 100,000)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an export already in the folder"
    )
    add_storage_arguments(p, "the table and the folder")


def run(args: argparse.Namespace) -> int:
    from clipbatch.tables.export import MAX_ROWS_PER_PARTITION, export_clip_retrieval

    rows = args.max_rows_per_partition
    report = export_clip_retrieval(
        args.root,
        args.to,
        storage_options(args),
        max_rows_per_partition=MAX_ROWS_PER_PARTITION if rows is None else rows,
        overwrite=args.overwrite,
    )
    print(report.summary())
    return 0
