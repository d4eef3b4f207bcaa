"""Near-duplicate pairs from a kNN index: every pair of rows whose vectors' cosine is at
least a threshold, with both rows' keys, as a Parquet table.

Each indexed vector is searched against the index itself (FAISS range search, in
batches), so the cost is one query per vector, not one per pair. Pairs are written once
(the row with the lower id first), sorted by cosine. LAION and NeMo Curator filter on
exactly this; a cosine of 0.95 between CLIP image vectors is a near-duplicate image.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipbatch.config import StorageOptions
from clipbatch.errors import ConfigError
from clipbatch.io.storage import get_fs, join, write_bytes_atomic
from clipbatch.knn.policy import faiss_module, ivf_lists
from clipbatch.knn.search import KnnIndex, open_index

log = logging.getLogger(__name__)

BATCH = 4096
PAIR_SCHEMA = pa.schema(
    [
        pa.field("cosine", pa.float32()),
        pa.field("key_a", pa.string()),
        pa.field("table_a", pa.string()),
        pa.field("file_a", pa.string()),
        pa.field("row_a", pa.int32()),
        pa.field("key_b", pa.string()),
        pa.field("table_b", pa.string()),
        pa.field("file_b", pa.string()),
        pa.field("row_b", pa.int32()),
    ]
)


@dataclass
class DedupReport:
    pairs: int
    rows_in_pairs: int
    vectors: int
    out: str
    build: str


def default_out(root: str, name: str, threshold: float) -> str:
    return join(root, "_knn", name, f"dedup-{threshold:g}.parquet")


def near_duplicates(
    root: str,
    threshold: float = 0.95,
    name: str = "image",
    out: str | None = None,
    storage: StorageOptions | None = None,
) -> DedupReport:
    """Write the near-duplicate pairs of index ``name`` under ``root`` to ``out``."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"threshold must be in (0, 1], got {threshold}")
    index = open_index(root, name, storage)
    if index is None:
        raise ConfigError(f"{root} has no kNN index {name!r}: run `clipbatch index {root}`")
    a, b, cos = _pairs(index, threshold)
    ids = index.ids
    pos_a = np.searchsorted(ids.column("id").to_numpy(), a)
    pos_b = np.searchsorted(ids.column("id").to_numpy(), b)
    side_a = ids.take(pa.array(pos_a, pa.int64()))
    side_b = ids.take(pa.array(pos_b, pa.int64()))
    columns: dict[str, Any] = {"cosine": pa.array(cos, pa.float32())}
    for suffix, side in (("a", side_a), ("b", side_b)):
        for col in ("key", "table", "file", "row"):
            columns[f"{col}_{suffix}"] = side.column(col)
    table = pa.table(columns, schema=PAIR_SCHEMA)
    table = table.sort_by([("cosine", "descending"), ("key_a", "ascending")])
    lineage = {
        "threshold": threshold,
        "index": name,
        "build": index.build.version,
        "vectors": int(index.index.ntotal),
        "model": index.build.info.get("model", {}).get("name"),
    }
    meta = {b"clipbatch.dedup": json.dumps(lineage, sort_keys=True).encode()}
    table = table.replace_schema_metadata(meta)
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    target = out or default_out(root, name, threshold)
    fs, path = get_fs(target, storage)
    write_bytes_atomic(fs, path, buf.getvalue())
    in_pairs = len(pc.unique(pa.concat_arrays([pa.array(a), pa.array(b)]))) if len(a) else 0
    log.info("%d near-duplicate pairs (cosine >= %g) -> %s", len(a), threshold, target)
    return DedupReport(len(a), in_pairs, int(index.index.ntotal), target, index.build.version)


def _pairs(index: KnnIndex, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(id_a, id_b, cosine) with id_a < id_b and cosine >= threshold."""
    faiss = faiss_module()
    raw = index.index
    if ivf_lists(index.build.info["factory"]):
        faiss.extract_index_ivf(raw).nprobe = index.nprobe
        faiss.extract_index_ivf(raw).make_direct_map()  # to reconstruct vectors by id
    all_ids = index.ids.column("id").to_numpy().astype(np.int64)
    out_a, out_b, out_c = [], [], []
    for start in range(0, len(all_ids), BATCH):  # bounded memory: one batch of queries
        queries = raw.reconstruct_batch(all_ids[start : start + BATCH])
        lims, scores, found = raw.range_search(np.ascontiguousarray(queries), threshold)
        owners = np.repeat(all_ids[start : start + BATCH], np.diff(lims).astype(np.int64))
        keep = found > owners  # each pair once; never a row with itself
        out_a.append(owners[keep])
        out_b.append(found[keep])
        out_c.append(scores[keep])
    if not out_a:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_c)
