"""An index made durable: its id map, its build record, and the commit of both with the index."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from clipbatch import __version__
from clipbatch.config import StorageOptions
from clipbatch.knn.policy import IndexSettings, default_nprobe
from clipbatch.knn.store import IDS_SCHEMA, StoredBuild, commit_build, ids_bytes
from clipbatch.knn.vectors import FileVectors
from clipbatch.tables.snapshot import Snapshot


@dataclass
class BuildReport:
    name: str
    root: str
    mode: str  # built | updated | current | skipped
    vectors: int
    added: int = 0
    removed: int = 0
    files: int = 0
    seconds: float = 0.0
    factory: str = ""
    version: str | None = None
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Ids:
    """Id -> (table, file, row, key), appended as vectors are added."""

    def __init__(self, start: int = 0, kept: pa.Table | None = None) -> None:
        self.next = start
        self.added = 0
        self.parts: list[pa.Table] = [kept] if kept is not None else []

    def assign(self, fv: FileVectors) -> np.ndarray:
        n = len(fv.rows)
        ids = np.arange(self.next, self.next + n, dtype=np.int64)
        self.next += n
        self.added += n
        self.parts.append(
            pa.table(
                {
                    "id": ids,
                    "table": [fv.file.table] * n,
                    "file": [fv.file.name] * n,
                    "row": fv.rows.astype(np.int32),
                    "key": fv.keys,
                },
                schema=IDS_SCHEMA,
            )
        )
        return ids

    def to_bytes(self) -> bytes:
        table = pa.concat_tables(self.parts) if self.parts else IDS_SCHEMA.empty_table()
        return ids_bytes(table)


def build_info(
    snap: Snapshot,
    name: str,
    column: str,
    model: dict[str, Any],
    factory: str,
    settings: IndexSettings,
    index: Any,
    counts: dict[str, int],
    trained_on: int,
    run_meta: dict[str, Any] | None,
    next_id: int,
) -> dict[str, Any]:
    return {
        "package_version": __version__,
        "name": name,
        "column": column,
        "root": snap.root,
        "model": model,
        "metric": "cosine (inner product of L2-normalised vectors)",
        "factory": factory,
        "nprobe": settings.nprobe or default_nprobe(factory),
        "dim": int(index.d),
        "vectors": int(index.ntotal),
        "trained_on": trained_on,
        "next_id": next_id,  # ids are never reused: a removed vector's id stays retired
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": dict(run_meta or {}),
        "tables": snap.tables,
        "files": [
            {
                "key": f.key,
                "table": f.table,
                "file": f.name,
                "version": f.version,
                "fingerprint": f.fingerprint,
                "vectors": counts.get(f.key, 0),
            }
            for f in snap.files
        ],
    }


def commit_index(
    faiss: Any,
    snap: Snapshot,
    name: str,
    index: Any,
    ids: Ids,
    info: dict[str, Any],
    storage: StorageOptions | None,
) -> StoredBuild:
    index_bytes = faiss.serialize_index(index).tobytes()
    return commit_build(snap.root, name, index_bytes, ids.to_bytes(), info, storage)
