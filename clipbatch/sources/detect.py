"""Guess the source kind from one listing, and ask for --source-kind when it is ambiguous.

The plan detects the kind once, from the listing it makes anyway, and hands the kind to
the readers: no shard task ever lists the dataset.
"""

from __future__ import annotations

from clipbatch.config import SourceConfig
from clipbatch.errors import ConfigError
from clipbatch.sources.listing import Listing, expand_braces, list_source_url

TABLE_SUFFIXES = (".parquet", ".csv", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".csv.gz")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def kind_from_url(url: str) -> str | None:
    """The kind a URL's own suffix names (``x.tar``, ``t.parquet``), or None."""
    first = expand_braces(url)[0].lower().rstrip("/")
    if first.endswith(TAR_SUFFIXES):
        return "webdataset"
    if first.endswith(TABLE_SUFFIXES):
        return "table"
    return None


def detect_kind(source: SourceConfig, listing: Listing | None = None) -> str:
    """The kind of ``source``, from its URL or else from what ``listing`` found."""
    by_url = kind_from_url(source.url)
    if by_url:
        return by_url
    if listing is None:
        listing = list_source_url(source)
    files = [i.path.lower() for i in listing.matches]
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
        f"cannot tell the source kind of {source.url!r} (found {found}); "
        "pass --source-kind webdataset|folder|table (source.kind in YAML)"
    )
