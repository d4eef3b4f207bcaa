"""Guess the source kind from the URL, and ask for --source-kind when it is ambiguous."""

from __future__ import annotations

from clipbatch.config import SourceConfig
from clipbatch.errors import ConfigError
from clipbatch.sources.listing import expand_braces, list_files
from clipbatch.storage import get_fs

TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".csv.gz")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def detect_kind(source: SourceConfig) -> str:
    url = source.url
    first = expand_braces(url)[0].lower().rstrip("/")
    if first.endswith(TAR_SUFFIXES):
        return "webdataset"
    if first.endswith(TABLE_SUFFIXES):
        return "table"
    fs, path = get_fs(url, source.storage)
    files = [p.lower() for p, _ in list_files(fs, path, (), recursive=True)]
    tars = sum(p.endswith(TAR_SUFFIXES) for p in files)
    images = tuple(f".{e.lower()}" for e in source.image_exts)
    n_images = sum(p.endswith(images) for p in files) if images else 0
    # img2dataset writes NNNNN.parquet beside NNNNN.tar: those are sidecars, not a table.
    tables = sum(p.endswith(TABLE_SUFFIXES) for p in files)
    if tars and not n_images:
        return "webdataset"
    if n_images and not tars and not tables:
        return "folder"
    if tables and not tars and not n_images:
        return "table"
    if not files:
        found = "no files"
    else:
        found = (
            ", ".join(
                f"{n} {what}"
                for n, what in (
                    (tars, "tar shard(s)"),
                    (n_images, "image(s)"),
                    (tables, "table file(s)"),
                )
                if n
            )
            or f"{len(files)} file(s) of no known kind"
        )
    raise ConfigError(
        f"cannot tell the source kind of {url!r} (found {found}); "
        "pass --source-kind webdataset|folder|table (source.kind in YAML)"
    )
