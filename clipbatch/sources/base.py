"""The reader interface, the registry that picks a reader, and listing a source once."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import pyarrow as pa

from clipbatch.config import SourceConfig
from clipbatch.errors import ConfigError
from clipbatch.io.storage import get_fs
from clipbatch.records import RawSample, ShardSpec
from clipbatch.sources.listing import Listing, list_source


class ShardReader(Protocol):
    """Turns a listing into shards, and streams the rows of one shard."""

    kind: str

    def shards_from(self, listing: Listing) -> list[ShardSpec]:
        """All shards of the listing, in a deterministic (sorted) order."""
        ...

    def passthrough_fields(self, shard: ShardSpec) -> list[pa.Field]:
        """Extra columns this shard's rows carry in ``RawSample.extra``, with stable types."""
        ...

    def read(self, shard: ShardSpec) -> Iterator[RawSample]:
        """Yield every row of ``shard``; bad rows come with a non-ok status, never silently dropped."""
        ...


def list_source_url(source: SourceConfig) -> Listing:
    """One listing of everything ``source.url`` names (see :mod:`clipbatch.sources.listing`)."""
    fs, path = get_fs(source.url, source.storage)
    return list_source(fs, path, source.url)


def get_reader(source: SourceConfig, kind: str | None = None) -> ShardReader:
    """The reader for ``kind`` (default ``source.kind``). The plan resolves 'auto' once;
    a reader is never asked to detect the kind, so no shard task lists the dataset."""
    if kind is None and source.kind == "auto":
        # Ad-hoc use (tests, the lineage tool): detect from one listing. The plan always
        # passes the kind it resolved, so shard tasks never get here.
        from clipbatch.sources.detect import detect_kind

        kind = detect_kind(source, list_source_url(source))
    kind = kind or source.kind
    if kind == "webdataset":
        from clipbatch.sources.webdataset import WebDatasetReader

        return WebDatasetReader(source)
    if kind == "folder":
        from clipbatch.sources.folder import FolderReader

        return FolderReader(source)
    if kind == "table":
        from clipbatch.sources.table import TableReader

        return TableReader(source)
    raise ConfigError(f"unknown source kind {kind!r}; use webdataset, folder or table")


def discover(source: SourceConfig) -> tuple[str, list[ShardSpec]]:
    """List ``source`` once; return its kind (detected when 'auto') and its shards."""
    from clipbatch.sources.detect import detect_kind

    listing = list_source_url(source)
    kind = source.kind if source.kind != "auto" else detect_kind(source, listing)
    return kind, get_reader(source, kind).shards_from(listing)


def check_unique_names(shards: list[ShardSpec]) -> None:
    """Two shards with one output name would overwrite each other: refuse the source."""
    names: dict[str, str] = {}
    for s in shards:
        if s.name in names:
            raise ConfigError(
                f"two shards map to the same output name {s.name!r}: {names[s.name]} and {s.uri}; "
                "point the source at one folder of shards"
            )
        names[s.name] = s.uri
