"""Which reader serves a source kind, and discovering a source: one listing, its kind, its shards.

The only module that knows every reader: readers import ``base``, ``detect`` and
``listing``, never this one, so the modules of ``sources/`` form no cycle.
"""

from __future__ import annotations

from clipbatch.config import SourceConfig
from clipbatch.errors import ConfigError
from clipbatch.records import ShardSpec
from clipbatch.sources.base import ShardReader
from clipbatch.sources.detect import detect_kind
from clipbatch.sources.folder import FolderReader
from clipbatch.sources.listing import list_source_url
from clipbatch.sources.table import TableReader
from clipbatch.sources.webdataset import WebDatasetReader

# kind -> reader class. ``config.SourceKind`` lists these kinds plus 'auto' (a test holds
# the two together).
READERS: dict[str, type[ShardReader]] = {
    "webdataset": WebDatasetReader,
    "folder": FolderReader,
    "table": TableReader,
}


def get_reader(source: SourceConfig, kind: str | None = None) -> ShardReader:
    """The reader for ``kind`` (default ``source.kind``). The plan resolves 'auto' once;
    a reader is never asked to detect the kind, so no shard task lists the dataset."""
    if kind is None and source.kind == "auto":
        # Ad-hoc use (tests, the lineage tool): detect from one listing. The plan always
        # passes the kind it resolved, so shard tasks never get here.
        kind = detect_kind(source, list_source_url(source))
    kind = kind or source.kind
    reader = READERS.get(kind)
    if reader is None:
        raise ConfigError(f"unknown source kind {kind!r}; use {', '.join(READERS)}")
    return reader(source)


def discover(source: SourceConfig) -> tuple[str, list[ShardSpec]]:
    """List ``source`` once; return its kind (detected when 'auto') and its shards."""
    listing = list_source_url(source)
    kind = source.kind if source.kind != "auto" else detect_kind(source, listing)
    return kind, get_reader(source, kind).shards_from(listing)
