"""A kNN index as a committed artifact: ``{root}/_knn/{name}/`` (docs/design.md §2, §13).

Each build is written whole into a folder of its own, then made current by one small
pointer, written last and atomically:

    {root}/_knn/image/v-20261201T120000123456Z-1a2b3c4d/index.faiss   the FAISS index
    {root}/_knn/image/v-20261201T120000123456Z-1a2b3c4d/ids.parquet   id -> table, file, row, key
    {root}/_knn/image/v-20261201T120000123456Z-1a2b3c4d/build.json    lineage: snapshot, model, settings
    {root}/_knn/image/CURRENT.json                              which build is the index

That is the commit protocol for a many-file artifact: stage (the version folder, which no
reader looks at), verify (sizes read back), then switch (the pointer). A crash at any
instant leaves the previous build current and the half-written folder unreferenced; the
next build removes folders that are neither current nor the one before.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import StorageOptions
from clipbatch.errors import ClipbatchError
from clipbatch.faults import crash_point
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs, join, read_bytes, remove_quietly, write_bytes_atomic

log = logging.getLogger(__name__)

KNN_DIR = "_knn"
CURRENT = "CURRENT.json"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.parquet"
BUILD_FILE = "build.json"

IDS_SCHEMA = pa.schema(
    [
        pa.field("id", pa.int64(), nullable=False),
        pa.field("table", pa.string()),
        pa.field("file", pa.string()),
        pa.field("row", pa.int32()),
        pa.field("key", pa.string()),
    ]
)


class IndexCorruptError(ClipbatchError):
    """A committed build does not read back as it was written."""


def index_uri(root: str, name: str) -> str:
    return join(root, KNN_DIR, name)


@dataclass
class StoredBuild:
    """A committed build: where it is, and its lineage (``build.json``)."""

    root: str
    name: str
    version: str
    info: dict[str, Any]

    @property
    def uri(self) -> str:
        return join(index_uri(self.root, self.name), self.version)

    def read(self, file: str, storage: StorageOptions | None) -> bytes:
        fs, path = get_fs(join(self.uri, file), storage)
        return read_bytes(fs, path)

    def ids(self, storage: StorageOptions | None, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.read(IDS_FILE, storage)), columns=columns)


def read_current(root: str, name: str, storage: StorageOptions | None = None) -> StoredBuild | None:
    """The current build of index ``name`` under ``root``, or None when there is none."""
    fs, path = get_fs(join(index_uri(root, name), CURRENT), storage)
    try:
        pointer = json.loads(read_bytes(fs, path))
    except FileNotFoundError:
        return None
    version = pointer["version"]
    build = StoredBuild(root, name, version, {})
    try:
        build.info = json.loads(build.read(BUILD_FILE, storage))
    except FileNotFoundError as e:
        raise IndexCorruptError(f"{build.uri}: CURRENT.json names a build that is gone") from e
    return build


def list_indexes(root: str, storage: StorageOptions | None = None) -> list[str]:
    """The names of the indexes under ``root`` that have a current build."""
    fs, path = get_fs(join(root, KNN_DIR), storage)
    try:
        entries = with_retries(lambda: fs.ls(path, detail=False), f"list {path}")
    except FileNotFoundError:
        return []
    names = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
    return [n for n in names if read_current(root, n, storage) is not None]


def new_version() -> str:
    """``v-{UTC time to the microsecond}-{random}``: versions sort in the order they were
    made (the clean-up below relies on it), and never collide."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"v-{stamp}-{uuid.uuid4().hex[:8]}"


def ids_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table.cast(IDS_SCHEMA), buf, compression="zstd")
    return buf.getvalue()


def commit_build(
    root: str,
    name: str,
    index: bytes,
    ids: bytes,
    info: dict[str, Any],
    storage: StorageOptions | None = None,
) -> StoredBuild:
    """Stage the build's files in a new version folder, verify them, then make it current."""
    version = new_version()
    build = StoredBuild(root, name, version, {**info, "version": version})
    files = {
        INDEX_FILE: index,
        IDS_FILE: ids,
        BUILD_FILE: json.dumps(build.info, indent=1, sort_keys=True).encode(),
    }
    for file, data in files.items():
        fs, path = get_fs(join(build.uri, file), storage)
        write_bytes_atomic(fs, path, data)
        if file == INDEX_FILE:
            crash_point("knn_mid_stage", name)
    for file, data in files.items():  # verify before the switch: every byte is there
        fs, path = get_fs(join(build.uri, file), storage)
        size = with_retries(lambda f=fs, p=path: f.size(p), f"stat {path}")
        if size != len(data):
            raise IndexCorruptError(f"{build.uri}/{file}: {size} bytes staged, {len(data)} written")
    crash_point("knn_before_pointer", name)
    pointer = {"version": version, "built_at": info.get("built_at"), "vectors": info.get("vectors")}
    fs, path = get_fs(join(index_uri(root, name), CURRENT), storage)
    write_bytes_atomic(fs, path, json.dumps(pointer, indent=1, sort_keys=True).encode())
    _remove_old_builds(root, name, version, info.get("parent"), storage)
    log.info("kNN index %s/%s/%s is current (%s vectors)", root, KNN_DIR, name, info.get("vectors"))
    return build


def _remove_old_builds(
    root: str, name: str, current: str, parent: str | None, storage: StorageOptions | None
) -> None:
    fs, path = get_fs(index_uri(root, name), storage)
    try:
        entries = with_retries(lambda: fs.ls(path, detail=False), f"list {path}")
    except FileNotFoundError:
        return
    keep = {current, parent}
    versions = sorted(
        v for v in (e.rstrip("/").rsplit("/", 1)[-1] for e in entries) if v.startswith("v-")
    )
    # The current build, the one before it, and any newer folder (a concurrent build
    # staging right now) stay; older ones, and half-written leftovers, go.
    for version in versions:
        if version in keep or version > current:
            continue
        remove_quietly(fs, f"{path.rstrip('/')}/{version}", recursive=True)
