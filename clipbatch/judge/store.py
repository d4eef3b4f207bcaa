"""Judgements beside a table: ``{table}/_scores/{name}/{shard}.parquet``.

The embedding files are never rewritten for a judgement: they are committed, and their
fingerprints are what resume relies on. A judgement's file is keyed by ``key`` (with the
shard ``file`` it scored, for joins), written whole in one PUT or rename (a crash leaves
no half-visible file), and bound to the version of the shard file it judged: the
folder's ``_index.json`` (rewritten whole at the end of each run) records, per shard,
the file version and the judge's identity (a head's sha256, or SemDeDup's parameters).
A shard whose entry is missing or names another version or judge is judged again: a new
nightly partition scores only its new files, a file rewritten by a retry is scored again.

The ``_`` prefix keeps every reader (and clipbatch's own table discovery) from taking
judgements for data. Reading them beside the table (DuckDB)::

    select t.key, t.caption, s.score
    from read_parquet('emb/*.parquet', filename=true) t
    join read_parquet('emb/_scores/aesthetic-laion-v2/*.parquet') s
      on s.key = t.key and s.file = parse_filename(t.filename)
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import StorageOptions
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs, join, read_bytes, remove_quietly, write_bytes_atomic
from clipbatch.sink.schema import encode_metadata

SCORES_DIR = "_scores"
INDEX_FILE = "_index.json"


def judgement_uri(table: str, name: str, shard: str | None = None) -> str:
    folder = join(table, SCORES_DIR, name)
    return join(folder, f"{shard}.parquet") if shard else folder


@dataclass
class JudgementIndex:
    """``_index.json`` of one table and judge: shard -> {file_version, judge, rows}."""

    table: str
    name: str
    storage: StorageOptions | None = None
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, table: str, name: str, storage: StorageOptions | None = None) -> JudgementIndex:
        fs, path = get_fs(join(judgement_uri(table, name), INDEX_FILE), storage)
        try:
            data = json.loads(read_bytes(fs, path))
        except FileNotFoundError:
            data = {}
        return cls(table, name, storage, dict(data.get("shards") or {}))

    def current(self, shard: str, file_version: str, judge: str) -> bool:
        entry = self.entries.get(shard)
        return (
            bool(entry)
            and entry.get("file_version") == file_version
            and entry.get("judge") == judge
        )

    def write(self) -> None:
        fs, path = get_fs(join(judgement_uri(self.table, self.name), INDEX_FILE), self.storage)
        body = {"version": 1, "name": self.name, "shards": dict(sorted(self.entries.items()))}
        write_bytes_atomic(fs, path, json.dumps(body, indent=1, sort_keys=True).encode())


def write_judgement(
    table: str,
    name: str,
    shard: str,
    data: pa.Table,
    metadata: dict[str, Any],
    storage: StorageOptions | None = None,
) -> None:
    """One shard's judgement, whole (nothing half-visible after a crash)."""
    meta = {**metadata, "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    buf = io.BytesIO()
    pq.write_table(data.replace_schema_metadata(encode_metadata(meta)), buf, compression="zstd")
    fs, path = get_fs(judgement_uri(table, name, shard), storage)
    write_bytes_atomic(fs, path, buf.getvalue())


def read_judgement(
    table: str, name: str, shard: str, storage: StorageOptions | None = None
) -> pa.Table | None:
    fs, path = get_fs(judgement_uri(table, name, shard), storage)
    try:
        return with_retries(lambda: pq.read_table(path, filesystem=fs), f"read {path}")
    except FileNotFoundError:
        return None


def remove_judgement(
    table: str, name: str, shard: str, storage: StorageOptions | None = None
) -> None:
    fs, path = get_fs(judgement_uri(table, name, shard), storage)
    remove_quietly(fs, path)


def judgements_of(table: str, storage: StorageOptions | None = None) -> list[str]:
    """The judgements a table has (its ``_scores/`` folders)."""
    fs, path = get_fs(join(table, SCORES_DIR), storage)
    try:
        entries = with_retries(lambda: fs.ls(path, detail=True), f"list {path}")
    except FileNotFoundError:
        return []
    return sorted(
        e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory"
    )
