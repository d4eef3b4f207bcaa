"""``clipbatch inspect DEST``: summarise and validate an output table; non-zero if inconsistent."""

from __future__ import annotations

import argparse

from clipbatch.config import StorageOptions

INCONSISTENT = 3  # distinct from 1 (run failure) and 2 (usage/config error)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest", help="the output table's URL (local path, s3://...)")
    p.add_argument(
        "--endpoint-url",
        help="S3-compatible endpoint (default: the environment, e.g. AWS_ENDPOINT_URL)",
    )


def run(args: argparse.Namespace) -> int:
    from clipbatch.query.table import open_table, validate

    table = open_table(args.dest, StorageOptions(endpoint_url=args.endpoint_url))
    report = validate(table)
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
    if report.ok:
        print("result:   consistent")
        return 0
    for problem in report.problems:
        print(f"PROBLEM:  {problem}")
    print(f"result:   INCONSISTENT ({len(report.problems)} problem(s))")
    return INCONSISTENT
