"""An output table, read back: its shard files and their footers, one file at a time.

Works from the table alone (local or any fsspec URL). Shard files are read one at a
time, so memory stays bounded by the largest shard.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import SinkConfig, StorageOptions
from clipbatch.errors import ClipbatchError
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs, join, read_parquet_columns, read_parquet_metadata
from clipbatch.sink.commits.segments import file_version
from clipbatch.sink.schema import decode_metadata

log = logging.getLogger(__name__)


class TableError(ClipbatchError):
    """The destination holds no readable embedding table."""


@dataclass(frozen=True)
class ShardFile:
    name: str  # e.g. 00000.parquet
    path: str  # the path on ``fs``
    rows: int
    metadata: dict[str, Any] | None
    schema: pa.Schema
    version: str | None = None  # as the listing reports it (what the commit index binds to)


@dataclass
class OutputTable:
    """The shard files under ``dest`` (bookkeeping names starting with '_' excluded)."""

    dest: str
    fs: Any
    root: str
    files: list[ShardFile]
    storage: StorageOptions | None = None

    def read(self, file: ShardFile, columns: Sequence[str] | None = None) -> pa.Table:
        """One shard file; with ``columns``, only their bytes are fetched."""
        if columns is None:
            return with_retries(
                lambda: pq.read_table(file.path, filesystem=self.fs), f"read {file.name}"
            )
        table = read_parquet_columns(self.fs, file.path, list(columns))
        if table is None:
            raise TableError(f"{file.name}: lacks one of the columns {list(columns)}")
        return table

    def iter_tables(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        for file in self.files:
            yield self.read(file, columns)

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Every shard, concatenated in shard order (small tables, tests, metrics)."""
        return pa.concat_tables(list(self.iter_tables(columns)))

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def model_metadata(self) -> dict[str, Any]:
        """The one model every shard was written with; raises TableError if they differ."""
        models = {
            (m["model"]["name"], m["model"]["checkpoint_sha256"])
            for m in (f.metadata for f in self.files)
            if m and "model" in m
        }
        if not models:
            raise TableError(f"{self.dest}: no shard carries clipbatch model metadata")
        if len(models) > 1:
            raise TableError(
                f"{self.dest}: shards were written by different models {sorted(models)}; "
                "their vectors are not comparable"
            )
        return next(m["model"] for m in (f.metadata for f in self.files) if m and "model" in m)

    def sink(self) -> SinkConfig:
        """The table as a sink, for reading its commit index."""
        return SinkConfig(url=self.dest, storage=self.storage or StorageOptions())


def open_table(dest: str, storage: StorageOptions | None = None) -> OutputTable:
    """List and read the footers of the shard files under ``dest``.

    Example::

        from clipbatch.tables.table import open_table

        table = open_table("s3://bucket/emb/vit-b-32/date=2026-12-03")
        table.rows, len(table.files)
        first = table.read(table.files[0], ["key", "caption", "status"])
    """
    fs, root = get_fs(dest, storage)
    root = root.rstrip("/")
    try:
        listing = with_retries(lambda: fs.ls(root, detail=True), f"list {dest}")
    except FileNotFoundError as e:
        raise TableError(f"{dest} does not exist") from e
    entries = sorted((e for e in listing if _is_shard_file(e["name"])), key=lambda e: e["name"])
    if not entries:
        raise TableError(f"{dest} holds no shard files (*.parquet)")
    files = []
    for e in entries:
        p = e["name"]
        meta = with_retries(lambda p=p: read_parquet_metadata(fs, p), f"read footer {p}")
        files.append(
            ShardFile(
                name=p.rsplit("/", 1)[-1],
                path=p,
                rows=meta.num_rows,
                metadata=decode_metadata(meta.metadata),
                schema=meta.schema.to_arrow_schema(),
                version=file_version(e, fs, p),
            )
        )
    return OutputTable(dest=dest, fs=fs, root=root, files=files, storage=storage)


def find_tables(
    root: str, storage: StorageOptions | None = None
) -> dict[str, dict[str, tuple[str, str]]]:
    """The tables under ``root``: a table's folder relative to ``root`` ("" for the root
    itself) -> shard name -> (path, listed version). One recursive listing, paged.

    A root is one destination, or a partition root holding nightly ``date=…/``
    destinations at any depth: every folder with shard files is a table.

    Example::

        from clipbatch.tables.table import find_tables

        find_tables("emb/")  # {'date=2026-12-02': {...}, 'date=2026-12-03': {...}}
    """
    from clipbatch.sources.listing import ObjectInfo, find_files, is_bookkeeping

    fs, base = get_fs(root, storage)
    base = base.rstrip("/")
    try:
        found = find_files(fs, base)
    except FileNotFoundError as e:
        raise TableError(f"{root} does not exist") from e
    if not found and not with_retries(lambda: fs.exists(base), f"stat {root}"):
        raise TableError(f"{root} does not exist")
    tables: dict[str, dict[str, tuple[str, str]]] = {}
    for path, info in found.items() if isinstance(found, dict) else found:
        rel = path[len(base) :].lstrip("/")
        if not rel.endswith(".parquet") or is_bookkeeping(rel):
            continue
        if isinstance(info, dict) and info.get("type", "file") != "file":
            continue
        version = info.version if isinstance(info, ObjectInfo) else file_version(info, fs, path)
        table, _, name = rel.rpartition("/")
        tables.setdefault(table, {})[name[: -len(".parquet")]] = (path, version)
    return {t: tables[t] for t in sorted(tables)}


def open_tables(root: str, storage: StorageOptions | None = None) -> list[OutputTable]:
    """Every table under ``root``: the root itself when it holds shard files, else each
    partition table below it (see :func:`find_tables`).

    Example::

        from clipbatch.tables.table import open_tables

        for table in open_tables("s3://bucket/emb/vit-b-32"):  # every date=... partition
            print(table.dest, table.rows)
    """
    tables = find_tables(root, storage)
    if not tables:
        raise TableError(f"{root} holds no shard files (*.parquet), nor tables below it")
    if "" in tables:
        return [open_table(root, storage)]
    return [open_table(join(root, t), storage) for t in tables]


def _is_shard_file(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.endswith(".parquet") and not name.startswith(("_", "."))
