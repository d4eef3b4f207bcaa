"""``clipbatch curate ROOT --spec curate.yaml``: a training set from a root's judgements.

Decides every new row (keep, or drop with every reason), copies the kept rows' images
byte for byte into new WebDataset shards in img2dataset's layout at the spec's output,
and records the selection under ``ROOT/_curate/{name}/``. Night after night: rows once
kept stay kept, new duplicates of earlier rows are dropped, shipped shards never change.

    clipbatch curate s3://bucket/emb --spec curate.yaml
    clipbatch curate emb/ --spec curate.yaml --output /data/curated   # override output.url
"""

from __future__ import annotations

import argparse

from clipbatch.cli.common import add_storage_arguments, storage_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="the table or partition root (local path, s3://...)")
    p.add_argument("--spec", required=True, help="the curation spec (YAML)")
    p.add_argument("--output", help="where the curated shards go (overrides output.url)")
    add_storage_arguments(p)


def run(args: argparse.Namespace) -> int:
    from clipbatch.curate.run import curate_root
    from clipbatch.curate.spec import load_spec

    spec = load_spec(args.spec)
    if args.output:
        spec = spec.model_copy(
            update={"output": spec.output.model_copy(update={"url": args.output})}
        )
    report = curate_root(args.root, spec, storage_options(args))
    where = f"{args.root.rstrip('/')}/_curate/{spec.name}"
    print(
        f"{where}: {report.files_decided} file(s) decided ({report.rows_decided:,} rows), "
        f"{report.files_current} current; kept {report.kept:,}, dropped {report.dropped:,}"
    )
    for kind, count in report.reasons.most_common():
        print(f"  dropped for {kind}: {count:,}")
    if report.files_waiting:
        print(
            f"  {len(report.files_waiting)} file(s) wait for their judgements "
            f"(e.g. {report.files_waiting[0]}): `clipbatch score` them, or name the heads in the spec"
        )
    shards = f"{report.shards[0]}..{report.shards[-1]}" if report.shards else "none"
    print(
        f"{spec.output.url.rstrip('/')}: {len(report.shards)} new shard(s) ({shards}), "
        f"{report.image_bytes / 1e6:.1f} MB of images"
    )
    return 0
