"""A selection's bookkeeping under ``{root}/_curate/{name}/``.

- ``state.json``: the commit point. The spec it is bound to (its identity), every
  source shard file decided with its version and counts, the curated shards shipped
  (and those staged but not yet published, after a crash), the next shard number.
- ``selection/{table}/{shard}.{tag}.parquet`` (``tag``: the file version's sha256, 10 hex
  digits; ``state.json`` names the current one): per source shard file, every row: ``key``,
  ``file``, ``file_version``, ``source_uri``, ``source_member``, ``source_version``,
  ``image_sha256``, ``keep``, ``reasons`` (every reason that dropped it), and for kept
  rows the curated ``shard`` and ``sample_key`` that hold it. Written whole; readers
  trust a file only when ``state.json`` binds its version (a crashed run's files are
  rewritten by the next run).

Example (DuckDB, every dropped row and why)::

    select key, reasons from read_parquet('emb/_curate/laion-style/selection/**/*.parquet')
    where not keep
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import StorageOptions
from clipbatch.errors import ConfigError
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs, join, read_bytes, write_bytes_atomic
from clipbatch.sink.schema import encode_metadata

CURATE_DIR = "_curate"
STATE_FILE = "state.json"
SELECTION_DIR = "selection"
SELECTION_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("file", pa.string()),
        pa.field("file_version", pa.string()),
        pa.field("source_uri", pa.string()),
        pa.field("source_member", pa.string()),
        pa.field("source_version", pa.string()),
        pa.field("image_sha256", pa.binary(32)),
        pa.field("keep", pa.bool_()),
        pa.field("reasons", pa.list_(pa.string())),
        pa.field("shard", pa.string()),  # the curated shard holding a kept row
        pa.field("sample_key", pa.string()),  # its key in that shard
    ]
)


def selection_home(root: str, name: str) -> str:
    return join(root, CURATE_DIR, name)


def list_selections(root: str, storage: StorageOptions | None = None) -> list[str]:
    """The names of the selections under ``root`` (``_curate/*/`` with a state)."""
    fs, path = get_fs(join(root, CURATE_DIR), storage)
    try:
        entries = with_retries(lambda: fs.ls(path, detail=True), f"list {path}")
    except FileNotFoundError:
        return []
    names = [
        e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"
    ]
    return sorted(n for n in names if SelectionState.read(root, n, storage) is not None)


@dataclass
class SelectionState:
    root: str
    name: str
    identity: str
    spec: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # table/file -> entry
    shards: list[dict[str, Any]] = field(default_factory=list)  # shipped, in order
    staged: list[dict[str, Any]] = field(default_factory=list)  # committed, not yet published
    next_shard: int = 0
    runs: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def read(
        cls, root: str, name: str, storage: StorageOptions | None = None
    ) -> SelectionState | None:
        fs, path = get_fs(join(selection_home(root, name), STATE_FILE), storage)
        try:
            data = json.loads(read_bytes(fs, path))
        except FileNotFoundError:
            return None
        return cls(
            root=root,
            name=name,
            identity=data["identity"],
            spec=data.get("spec") or {},
            files=dict(data.get("files") or {}),
            shards=list(data.get("shards") or []),
            staged=list(data.get("staged") or []),
            next_shard=int(data.get("next_shard") or 0),
            runs=list(data.get("runs") or []),
        )

    def check(self, identity: str) -> None:
        if identity != self.identity:
            raise ConfigError(
                f"the selection {self.name!r} under {self.root} was made by another spec "
                f"(rules or output changed: {self.identity[:12]} then, {identity[:12]} now); "
                "a selection is never edited: give the changed spec a new name"
            )

    def bound(self, file_key: str, version: str | None) -> bool:
        """Whether the selection file of ``file_key`` is the committed one for ``version``."""
        entry = self.files.get(file_key)
        return bool(entry) and version is not None and entry.get("version") == version

    def write(self, storage: StorageOptions | None = None) -> None:
        body = {
            "version": 1,
            "name": self.name,
            "identity": self.identity,
            "spec": self.spec,
            "next_shard": self.next_shard,
            "files": dict(sorted(self.files.items())),
            "shards": self.shards,
            "staged": self.staged,
            "runs": self.runs[-30:],  # the latest runs, for people; lineage is in the shards
        }
        fs, path = get_fs(join(selection_home(self.root, self.name), STATE_FILE), storage)
        write_bytes_atomic(fs, path, json.dumps(body, indent=1, sort_keys=True).encode())


def write_selection(
    uri: str, rows: pa.Table, metadata: dict[str, Any], storage: StorageOptions | None
) -> None:
    buf = io.BytesIO()
    table = rows.cast(SELECTION_SCHEMA).replace_schema_metadata(encode_metadata(metadata))
    pq.write_table(table, buf, compression="zstd")
    fs, path = get_fs(uri, storage)
    write_bytes_atomic(fs, path, buf.getvalue())


def read_selection(uri: str, storage: StorageOptions | None) -> pa.Table | None:
    fs, path = get_fs(uri, storage)
    try:
        return with_retries(lambda: pq.read_table(path, filesystem=fs), f"read {path}")
    except FileNotFoundError:
        return None
