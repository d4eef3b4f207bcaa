"""``clipbatch lineage <dest> [--key K]``: where rows came from, and whether still current.

Exit status: 0 when every source object still has the version its rows were embedded
from, 1 when some are stale (changed or gone), 2 on errors (no table, bad URL).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from clipbatch.cli.common import add_storage_arguments, storage_options
from clipbatch.errors import SourceError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", help="the embedding table's URL (what `clipbatch run --dest` wrote)")
    p.add_argument("--key", help="trace a single row by its key")
    add_storage_arguments(p, "the table and the sources")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    from clipbatch.lineage.inspect import file_lineage, find_row, table_files

    storage = storage_options(args)
    files = table_files(args.dest, storage)
    row: dict[str, Any] | None = None
    if args.key is not None:
        found = find_row(files, args.key, storage)
        if found is None:
            raise SourceError(f"no row with key {args.key!r} in {args.dest}")
        file_uri, row = found
        files = [file_uri]
    folders: dict[str, dict[str, str]] = {}
    report = [file_lineage(f, storage, storage, folders) for f in files]
    stale = [r for r in report if r.stale]
    if args.json:
        print(
            json.dumps(
                {
                    "dest": args.dest,
                    "row": row,
                    "files": [{**vars(r), "stale": r.stale} for r in report],
                    "stale": len(stale),
                },
                indent=2,
                default=str,
            )
        )
    else:
        _print_text(report, row)
    return 1 if stale else 0


def _print_text(report: list[Any], row: dict[str, Any] | None) -> None:
    if row is not None:
        print(f"key:          {row['key']}")
        print(f"member:       {row['source_member']}  (status {row['status']})")
        print(f"image sha256: {row['image_sha256']}")
    for r in report:
        state = "STALE" if r.stale else "current"
        now = r.current_version or "missing"
        print(f"file:         {r.file}  ({r.rows} rows)")
        print(f"source:       {r.source_uri}")
        print(f"  version:    {r.source_version}  [{state}; now {now}]")
        print(
            f"model:        {r.model.get('name')}  "
            f"checkpoint sha256 {r.model.get('checkpoint_sha256')}"
        )
        run_id = r.run.get("flow_run_id") or r.run.get("run_id")
        print(f"run:          {run_id} ({r.run.get('flow_run_name') or '-'})")
        print(f"written at:   {r.written_at}")
    stale = sum(r.stale for r in report)
    if stale:
        print(f"{stale} of {len(report)} file(s) are stale: their source changed; rerun to redo")
