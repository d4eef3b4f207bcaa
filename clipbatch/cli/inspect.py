"""``clipbatch inspect ROOT``: summarise and validate a table (or each table of a partition
root) and its kNN indexes; non-zero if a table is inconsistent.

A stale kNN index (its tables changed since it was built) is reported, not an
inconsistency: the table is fine, the index lags it. ``--fail-stale`` makes it one.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from clipbatch.cli.common import add_storage_arguments, storage_options
from clipbatch.config import StorageOptions

if TYPE_CHECKING:
    from clipbatch.query.validate import Report

INCONSISTENT = 3  # distinct from 1 (run failure) and 2 (usage/config error)
STALE_INDEX = 4


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", help="the table or partition root (local path, s3://...)")
    p.add_argument(
        "--fail-stale", action="store_true", help=f"exit {STALE_INDEX} if a kNN index is stale"
    )
    add_storage_arguments(p)


def run(args: argparse.Namespace) -> int:
    from clipbatch.query.validate import validate
    from clipbatch.tables.table import open_tables

    storage = storage_options(args)
    tables = open_tables(args.dest, storage)
    problems = 0
    for table in tables:
        report = validate(table)
        _print_report(report)
        problems += len(report.problems)
        if len(tables) > 1:
            print()
    stale = _print_indexes(args.dest, storage)
    if problems:
        print(f"result:   INCONSISTENT ({problems} problem(s))")
        return INCONSISTENT
    print(f"result:   consistent{' (kNN index stale)' if stale else ''}")
    return STALE_INDEX if stale and args.fail_stale else 0


def _print_report(report: Report) -> None:
    print(f"table:    {report.dest}")
    print(f"shards:   {report.shards}")
    print(f"rows:     {report.rows}")
    statuses = ", ".join(f"{k}={v}" for k, v in sorted(report.status_counts.items()))
    print(f"status:   {statuses or '-'}")
    print(
        f"dtype:    {', '.join(sorted(report.dtypes)) or '-'}; "
        f"dim {', '.join(str(d) for d in sorted(report.embed_dims)) or '-'}"
    )
    for name, sha in sorted(report.models):
        print(f"model:    {name} (checkpoint sha256 {sha})")
    if report.norm_min <= report.norm_max:
        print(f"norms:    {report.norm_min:.4f} .. {report.norm_max:.4f}")
    for note in report.notes:
        print(f"note:     {note}")
    for problem in report.problems:
        print(f"PROBLEM:  {problem}")


def _print_indexes(root: str, storage: StorageOptions) -> bool:
    """One line per kNN index under ``root``; True if any is stale."""
    from clipbatch.knn.search import staleness
    from clipbatch.knn.store import list_indexes, read_current
    from clipbatch.tables.snapshot import snapshot

    names = list_indexes(root, storage)
    if not names:
        print("kNN:      none (`clipbatch index` builds one)")
        return False
    snap = snapshot(root, storage)
    any_stale = False
    for name in names:
        build = read_current(root, name, storage)
        assert build is not None
        info = build.info
        state = staleness(build, snap)
        any_stale |= state.stale
        print(
            f"kNN:      _knn/{name}: {info['factory']}, {info['vectors']:,} vectors of "
            f"{len(info['files'])} file(s), built {info['built_at']}; {state.describe()}"
        )
    return any_stale
