"""The reader interface and the registry that picks a reader for a source."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import pyarrow as pa

from clipbatch.config import SourceConfig
from clipbatch.errors import ConfigError
from clipbatch.records import RawSample, ShardSpec


class ShardReader(Protocol):
    """Lists a dataset's shards and streams the rows of one shard."""

    kind: str

    def list_shards(self) -> list[ShardSpec]:
        """All shards, in a deterministic (sorted) order."""
        ...

    def passthrough_fields(self, shard: ShardSpec) -> list[pa.Field]:
        """Extra columns this shard's rows carry in ``RawSample.extra``, with stable types."""
        ...

    def read(self, shard: ShardSpec) -> Iterator[RawSample]:
        """Yield every row of ``shard``; bad rows come with a non-ok status, never silently dropped."""
        ...


def get_reader(source: SourceConfig) -> ShardReader:
    """The reader for ``source``, detecting the kind from the URL when it is 'auto'."""
    from clipbatch.sources.detect import detect_kind

    kind = source.kind if source.kind != "auto" else detect_kind(source)
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


def list_shards(source: SourceConfig) -> list[ShardSpec]:
    return get_reader(source).list_shards()
