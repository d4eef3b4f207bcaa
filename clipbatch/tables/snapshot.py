"""The tables under a root, as one snapshot: every shard file, its version and fingerprint.

The tables are :func:`clipbatch.tables.table.find_tables`'s (one recursive listing of the
root); each table's commit index gives the fingerprints (a few reads per table, never
one per file).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import fsspec

from clipbatch.config import SinkConfig, StorageOptions
from clipbatch.errors import ConfigError
from clipbatch.io.storage import get_fs, join
from clipbatch.sink.commits.index import load_index
from clipbatch.tables.table import TableError, find_tables


@dataclass(frozen=True)
class TableFile:
    """One shard file of one table under the root."""

    table: str  # the table's folder, relative to the root ("" for the root itself)
    name: str  # e.g. 00000.parquet
    path: str  # on the snapshot's filesystem
    version: str  # as listed (what the commit index binds to)
    fingerprint: str | None = None  # from the table's commit index, when recorded

    @property
    def key(self) -> str:
        return f"{self.table}/{self.name}" if self.table else self.name


@dataclass
class Snapshot:
    root: str
    fs: fsspec.AbstractFileSystem
    files: list[TableFile] = field(default_factory=list)

    @property
    def tables(self) -> list[str]:
        return sorted({f.table for f in self.files})

    def by_key(self) -> dict[str, TableFile]:
        return {f.key: f for f in self.files}


def snapshot(root: str, storage: StorageOptions | None = None) -> Snapshot:
    """Every shard file of every table under ``root``, sorted, with versions and fingerprints.

    Example::

        from clipbatch.tables.snapshot import snapshot

        snap = snapshot("s3://bucket/emb/vit-b-32")
        [(f.table, f.name, f.version) for f in snap.files][:3]
    """
    storage = storage or StorageOptions()
    fs, _ = get_fs(root, storage)
    try:
        tables = find_tables(root, storage)
    except TableError as e:
        raise ConfigError(str(e)) from e
    files = []
    for table, shards in tables.items():
        sink = SinkConfig(url=join(root, table) if table else root, storage=storage)
        index = load_index(sink, {shard: version for shard, (_, version) in shards.items()})
        for shard, (path, version) in shards.items():
            files.append(
                TableFile(table, f"{shard}.parquet", path, version, index.fingerprint(shard))
            )
    if not files:
        raise ConfigError(f"{root} holds no table (no shard files under it)")
    return Snapshot(root=root, fs=fs, files=sorted(files, key=lambda f: f.key))


def partition_root(dest: str) -> str:
    """The table root a destination belongs to: ``s3://b/emb/date=2026-11-30/`` is a
    partition of ``s3://b/emb``, and so is ``…/year=2026/month=11/``; any other
    destination is its own root."""
    parts = dest.rstrip("/").split("/")
    while len(parts) > 1 and "=" in parts[-1] and parts[-2] and not parts[-2].endswith(":"):
        parts.pop()
    return "/".join(parts)
