"""Query a committed kNN index, and tell whether it still matches its tables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from clipbatch.config import StorageOptions
from clipbatch.io.storage import get_fs, join, read_parquet_columns
from clipbatch.knn.policy import faiss_module, ivf_lists
from clipbatch.knn.store import INDEX_FILE, StoredBuild, read_current
from clipbatch.tables.snapshot import Snapshot, snapshot


@dataclass
class Staleness:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)

    @property
    def stale(self) -> bool:
        return bool(self.added or self.changed or self.removed)

    def describe(self) -> str:
        if not self.stale:
            return "current"
        parts = [
            f"{len(v)} file(s) {what}"
            for what, v in (
                ("added", self.added),
                ("rewritten", self.changed),
                ("gone", self.removed),
            )
            if v
        ]
        return "STALE: " + ", ".join(parts) + " since it was built"


def staleness(build: StoredBuild, snap: Snapshot) -> Staleness:
    """How the tables now differ from the snapshot the build recorded."""
    old = {f["key"]: f["version"] for f in build.info["files"]}
    now = {f.key: f.version for f in snap.files}
    return Staleness(
        added=sorted(set(now) - set(old)),
        changed=sorted(k for k in set(now) & set(old) if now[k] != old[k]),
        removed=sorted(set(old) - set(now)),
    )


@dataclass
class KnnIndex:
    """A loaded build: the FAISS index, its id map, and how it is searched."""

    build: StoredBuild
    index: Any
    ids: pa.Table  # id, table, file, row, key; sorted by id
    nprobe: int

    @property
    def describe(self) -> str:
        info = self.build.info
        probe = f", nprobe {self.nprobe}" if ivf_lists(info["factory"]) else ""
        return (
            f"kNN index _knn/{self.build.name} ({info['factory']}{probe}, "
            f"{info['vectors']:,} vectors, built {info['built_at']})"
        )

    def search(self, vectors: np.ndarray, k: int) -> list[list[tuple[float, dict[str, Any]]]]:
        """Top ``k`` per query: (cosine, {id, table, file, row, key})."""
        if ivf_lists(self.build.info["factory"]):
            faiss_module().extract_index_ivf(self.index).nprobe = self.nprobe
        scores, ids = self.index.search(np.ascontiguousarray(vectors, np.float32), k)
        found = ids[ids >= 0]
        rows = self._rows(np.unique(found))
        return [
            [(float(s), rows[int(i)]) for s, i in zip(qs, qi, strict=True) if i >= 0]
            for qs, qi in zip(scores, ids, strict=True)
        ]

    def _rows(self, ids: np.ndarray) -> dict[int, dict[str, Any]]:
        all_ids = self.ids.column("id").to_numpy()
        at = np.searchsorted(all_ids, ids)
        picked = self.ids.take(pa.array(at, type=pa.int64()))
        return {int(r["id"]): r for r in picked.to_pylist()}


def open_index(
    root: str, name: str = "image", storage: StorageOptions | None = None, nprobe: int | None = None
) -> KnnIndex | None:
    """The current build of ``name`` under ``root``, loaded; None when there is none.

    Example::

        from clipbatch.knn.search import open_index

        index = open_index("emb/", "image")
        if index is not None:
            for score, row in index.search(query_vectors, 10)[0]:  # the first query's top 10
                print(score, row["table"], row["key"])
    """
    build = read_current(root, name, storage)
    if build is None:
        return None
    faiss = faiss_module()
    index = faiss.deserialize_index(np.frombuffer(build.read(INDEX_FILE, storage), np.uint8))
    ids = build.ids(storage).sort_by("id")
    return KnnIndex(build, index, ids, nprobe or int(build.info.get("nprobe") or 1))


def captions_of(
    root: str, hits: list[dict[str, Any]], storage: StorageOptions | None
) -> dict[int, str | None]:
    """Captions of hit rows: one read (key and caption columns) per file hit."""
    out: dict[int, str | None] = {}
    by_file: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for hit in hits:
        by_file.setdefault((hit["table"], hit["file"]), []).append(hit)
    for (table, file), rows in by_file.items():
        uri = join(root, table, file) if table else join(root, file)
        fs, path = get_fs(uri, storage)
        data = read_parquet_columns(fs, path, ["key", "caption"])
        if data is None:
            continue  # a file rewritten without captions since the build: none to show
        # A stale index may name rows a rewritten file no longer has; the key check
        # below shows no caption rather than another row's.
        rows = [r for r in rows if r["row"] < data.num_rows]
        picked = data.take(pa.array([r["row"] for r in rows], type=pa.int64()))
        for r, key, caption in zip(
            rows,
            picked.column("key").to_pylist(),
            picked.column("caption").to_pylist(),
            strict=True,
        ):
            out[r["id"]] = caption if key == r["key"] else None
    return out


def index_staleness(root: str, name: str, storage: StorageOptions | None) -> Staleness | None:
    build = read_current(root, name, storage)
    return None if build is None else staleness(build, snapshot(root, storage))
