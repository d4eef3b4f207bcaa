"""Read lineage back from a table: per file and per row, and check it is still current.

A row is **stale** when the source object it was embedded from has changed since
(its recorded ETag / version id / size+mtime no longer matches the object's) or is
gone: the embedding no longer describes the source.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipbatch.config import StorageOptions
from clipbatch.errors import ClipbatchError, SourceError
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs, object_version, to_uri
from clipbatch.sink.writer import read_file_metadata

log = logging.getLogger(__name__)

ROW_COLUMNS = ["key", "source_uri", "source_member", "source_version", "image_sha256", "status"]


@dataclass
class FileLineage:
    file: str
    source_uri: str | None
    source_version: str | None
    current_version: str | None  # None: the source object is gone
    model: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    written_at: str | None = None
    rows: int | None = None
    fingerprint: str | None = None

    @property
    def stale(self) -> bool:
        return not versions_match(self.source_version, self.current_version)


def versions_match(recorded: str | None, current: str | None) -> bool:
    return bool(recorded) and recorded == current


def current_version(uri: str, recorded: str | None, storage: StorageOptions) -> str | None:
    """The object's version now, in the same form as ``recorded`` (etag vs version id)."""
    fs, path = get_fs(uri, storage)
    try:
        info = with_retries(lambda: fs.info(path), f"stat {uri}")
    except FileNotFoundError:
        return None
    if recorded and recorded.startswith("etag:"):
        # A HEAD on a versioned bucket also returns VersionId, a listing does not: compare
        # like with like so a versioned bucket does not read as stale.
        etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
        if etag:
            return f"etag:{str(etag).strip(chr(34))}"
    return object_version(fs, path, info)


def table_files(dest: str, storage: StorageOptions) -> list[str]:
    fs, path = get_fs(dest, storage)
    try:
        entries = with_retries(lambda: fs.ls(path, detail=False), f"list {dest}")
    except FileNotFoundError as e:
        raise SourceError(f"no table at {dest}") from e
    return sorted(
        to_uri(fs, e)
        for e in entries
        if e.endswith(".parquet") and not e.rsplit("/", 1)[-1].startswith(("_", "."))
    )


def folder_versions(
    uri: str, source_options: dict[str, Any], storage: StorageOptions
) -> dict[str, str]:
    """Shard name -> version now, for a folder source: its shards hash their members."""
    from clipbatch.config import SourceConfig
    from clipbatch.sources.registry import get_reader

    known = {k: v for k, v in source_options.items() if k in SourceConfig.model_fields}
    known.update(url=uri, kind="folder", storage=storage)
    try:
        shards = get_reader(SourceConfig.model_validate(known)).list_shards()
    except (FileNotFoundError, ClipbatchError) as e:
        log.info("cannot list folder source %s: %s", uri, e)
        return {}
    return {s.name: s.version for s in shards}


def file_lineage(
    file_uri: str,
    storage: StorageOptions,
    source_storage: StorageOptions,
    folder_cache: dict[str, dict[str, str]] | None = None,
) -> FileLineage:
    meta = read_file_metadata(file_uri, storage) or {}
    source = meta.get("source") or {}
    uri, version = source.get("uri"), source.get("version")
    if not uri:
        now = None
    elif source.get("kind") == "folder":
        # A folder shard's version hashes its members' versions: list and hash again,
        # once per folder however many files came from it.
        cache = folder_cache if folder_cache is not None else {}
        if uri not in cache:
            options = (meta.get("options") or {}).get("source_options") or {}
            cache[uri] = folder_versions(uri, options, source_storage)
        name = file_uri.rsplit("/", 1)[-1].removesuffix(".parquet")
        now = cache[uri].get(name)
    else:
        now = current_version(uri, version, source_storage)
    return FileLineage(
        file=file_uri,
        source_uri=uri,
        source_version=version,
        current_version=now,
        model=meta.get("model") or {},
        run=meta.get("run") or {},
        written_at=meta.get("written_at"),
        rows=meta.get("rows"),
        fingerprint=meta.get("fingerprint"),
    )


def find_row(
    files: list[str], key: str, storage: StorageOptions
) -> tuple[str, dict[str, Any]] | None:
    """The file holding ``key`` and that row's lineage columns."""
    for uri in files:
        fs, path = get_fs(uri, storage)
        table = with_retries(
            lambda p=path, f=fs: pq.read_table(p, filesystem=f, columns=ROW_COLUMNS),
            f"read {uri}",
        )
        hits = table.filter(pc.equal(table.column("key"), key))
        if hits.num_rows:
            row = hits.slice(0, 1).to_pylist()[0]
            sha = row.get("image_sha256")
            row["image_sha256"] = sha.hex() if sha else None
            return uri, row
    return None
