"""An index kept current: drop the ids of files gone or rewritten, add new and rewritten files."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipbatch.config import StorageOptions
from clipbatch.knn.commit import BuildReport, Ids, build_info, commit_index
from clipbatch.knn.policy import IndexSettings
from clipbatch.knn.store import StoredBuild
from clipbatch.knn.vectors import OneModel, iter_vectors
from clipbatch.tables.snapshot import Snapshot, TableFile


def update_index(
    faiss: Any,
    current: StoredBuild,
    snap: Snapshot,
    column: str,
    gone: list[str],
    new: list[TableFile],
    settings: IndexSettings,
    storage: StorageOptions | None,
    run_meta: dict[str, Any] | None,
) -> BuildReport:
    """Incremental: drop the ids of files gone or rewritten, add new and rewritten files."""
    info = current.info
    index = faiss.deserialize_index(np.frombuffer(current.read("index.faiss", storage), np.uint8))
    old_ids = current.ids(storage)
    file_keys = pc.binary_join_element_wise(old_ids.column("table"), old_ids.column("file"), "/")
    file_keys = pc.if_else(pc.equal(old_ids.column("table"), ""), old_ids.column("file"), file_keys)
    drop = pc.is_in(file_keys, value_set=pa.array(gone, type=pa.string()))
    removed = 0
    if gone:
        doomed = pc.filter(old_ids.column("id"), drop).to_numpy()
        removed = int(index.remove_ids(faiss.IDSelectorBatch(doomed.astype(np.int64))))
    kept = old_ids.filter(pc.invert(drop))
    ids = Ids(start=int(info.get("next_id", 0)), kept=kept)
    gone_keys = set(gone)
    counts = {f["key"]: f.get("vectors", 0) for f in info["files"] if f["key"] not in gone_keys}
    model = OneModel(snap.root, info.get("model"))
    for fv in iter_vectors(snap, new, column):
        model.check(fv)  # another model: ModelChangedError, and build_index rebuilds
        counts[fv.file.key] = len(fv.rows)
        if len(fv.rows):
            index.add_with_ids(fv.vectors, ids.assign(fv))
    factory = info["factory"]
    trained = info.get("trained_on", 0)
    out = build_info(
        snap, current.name, column, model.model or {}, factory, settings, index, counts, trained, run_meta,
        ids.next,
    )  # fmt: skip
    out["parent"] = current.version
    build = commit_index(faiss, snap, current.name, index, ids, out, storage)
    return BuildReport(
        current.name, snap.root, "updated", int(index.ntotal), added=ids.added, removed=removed,
        files=len(snap.files), factory=factory, version=build.version,
    )  # fmt: skip
