"""Search over a root's rows: the kNN index when there is one, brute force otherwise.

**Filters stay exact with an index.** A filter (statuses, partitions, a similarity range)
becomes a bitmap over the index's ids, handed to FAISS as an ``IDSelectorBitmap``: the
index only ever returns rows that pass, so a filtered query is never k minus the rows
the filter dropped (over-fetching can be). An IVF index still searches ``nprobe`` lists
only: with a very narrow filter, fewer than ``k`` rows may be found, as without one.

A stale index (tables changed since it was built) is used and said to be stale; rows of
files added since are not in it, so ``use_index=False`` answers from every row.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipbatch.config import StorageOptions
from clipbatch.errors import ConfigError
from clipbatch.knn.policy import faiss_module, ivf_lists
from clipbatch.knn.search import KnnIndex, Staleness, index_staleness, open_index
from clipbatch.serve.catalog import RowCatalog, load_catalog

log = logging.getLogger(__name__)

BRUTE_CHUNK = 65_536  # rows per matrix product in brute force


@dataclass(frozen=True)
class Method:
    kind: str  # knn | brute force
    detail: str
    stale: bool = False
    filter: str = "none"

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "detail": self.detail,
            "stale": self.stale,
            "filter": self.filter,
        }


class RootSearch:
    """A root's catalog, and its index (or its vectors) ready for queries."""

    def __init__(
        self, root: str, storage: StorageOptions | None = None, use_index: bool = True
    ) -> None:
        self.root = root
        self.index: KnnIndex | None = open_index(root, "image", storage) if use_index else None
        self.catalog: RowCatalog = load_catalog(root, storage, with_vectors=self.index is None)
        self.staleness: Staleness | None = None
        if self.index is not None:
            self.staleness = index_staleness(root, "image", storage)
            self._map_ids()

    # -- ids <-> catalog rows ----------------------------------------------------------------
    def _map_ids(self) -> None:
        """Each index id's catalog row (-1 for rows of files gone or rewritten since)."""
        assert self.index is not None
        ids = self.index.ids
        files = {(f.table, f.name): f for f in self.catalog.files}
        id_values = ids.column("id").to_numpy()
        size = int(self.index.build.info.get("next_id") or 0)
        size = max(size, int(id_values.max()) + 1 if len(id_values) else 0)
        starts = np.array(
            [
                (f.start if (f := files.get(tf)) is not None else -1)
                for tf in zip(
                    ids.column("table").to_pylist(), ids.column("file").to_pylist(), strict=True
                )
            ],
            np.int64,
        )
        rows = ids.column("row").to_numpy().astype(np.int64)
        at = np.where(starts >= 0, starts + rows, -1)
        in_range = (at >= 0) & (at < len(self.catalog))
        # A rewritten file may hold other rows at the same place: the key must match too.
        same = np.zeros(len(at), bool)
        if in_range.any():
            picked = self.catalog.rows.column("key").take(pa.array(at[in_range]))
            keys = ids.column("key").filter(pa.array(in_range))
            same[in_range] = pc.equal(picked, keys).to_numpy(zero_copy_only=False)
        self.catalog_of_id = np.full(size, -1, np.int64)
        self.catalog_of_id[id_values[same]] = at[same]
        self.id_of_catalog = np.full(len(self.catalog), -1, np.int64)
        self.id_of_catalog[at[same]] = id_values[same]
        if ivf_lists(self.index.build.info["factory"]):
            # Reconstructing a row's vector ("more like this") needs the id -> list map.
            faiss = faiss_module()
            faiss.extract_index_ivf(self.index.index).set_direct_map_type(faiss.DirectMap.Hashtable)

    # -- what a query is ------------------------------------------------------------------
    def row_vector(self, i: int) -> np.ndarray:
        """Row ``i``'s image vector, for "more like this"."""
        if self.index is None:
            assert self.catalog.vectors is not None and self.catalog.has_vector is not None
            if not self.catalog.has_vector[i]:
                raise ConfigError("this row has no image vector (its status says why)")
            return self.catalog.vectors[i].astype(np.float32)
        id_ = int(self.id_of_catalog[i])
        if id_ < 0:
            raise ConfigError("this row is not in the kNN index (no image vector, or added since)")
        return np.asarray(self.index.index.reconstruct(id_), np.float32)

    # -- search ---------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int,
        mask: np.ndarray | None = None,
        exclude: int | None = None,
    ) -> tuple[list[list[tuple[int, float]]], Method]:
        """Top ``k`` (catalog row, cosine) per query vector, and how they were found."""
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        if exclude is not None:
            mask = np.ones(len(self.catalog), bool) if mask is None else mask.copy()
            mask[exclude] = False
        if self.index is None:
            return self._brute(queries, k, mask), self.method(mask)
        return self._knn(queries, k, mask), self.method(mask)

    def method(self, mask: np.ndarray | None = None) -> Method:
        """How queries are answered (with ``mask``: how the filter is applied)."""
        if self.index is None:
            return Method(
                "brute force",
                f"brute force over {len(self.catalog):,} rows (no kNN index; "
                "`clipbatch index` builds one)",
                filter="applied to every row" if mask is not None else "none",
            )
        state = self.staleness.describe() if self.staleness is not None else "current"
        stale = bool(self.staleness and self.staleness.stale)
        how = "FAISS IDSelectorBitmap over the index's ids" if mask is not None else "none"
        return Method("knn", f"{self.index.describe}; {state}", stale, how)

    def _knn(
        self, queries: np.ndarray, k: int, mask: np.ndarray | None
    ) -> list[list[tuple[int, float]]]:
        assert self.index is not None
        faiss = faiss_module()
        info = self.index.build.info
        params = None
        if ivf_lists(info["factory"]):
            params = faiss.SearchParametersIVF(nprobe=self.index.nprobe)
        if mask is not None:
            allowed = np.zeros(len(self.catalog_of_id), bool)
            known = self.catalog_of_id >= 0
            allowed[known] = mask[self.catalog_of_id[known]]
            bitmap = np.packbits(allowed, bitorder="little")
            selector = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))
            params = params or faiss.SearchParameters()
            params.sel = selector
            self._keep_alive = (bitmap, selector)  # FAISS holds raw pointers to both
        scores, ids = self.index.index.search(
            np.ascontiguousarray(queries, np.float32), k, params=params
        )
        out = []
        for qs, qi in zip(scores, ids, strict=True):
            hits = []
            for s, i in zip(qs.tolist(), qi.tolist(), strict=True):
                if i < 0 or i >= len(self.catalog_of_id) or self.catalog_of_id[i] < 0:
                    continue
                hits.append((int(self.catalog_of_id[i]), float(s)))
            out.append(hits)
        return out

    def _brute(
        self, queries: np.ndarray, k: int, mask: np.ndarray | None
    ) -> list[list[tuple[int, float]]]:
        catalog = self.catalog
        assert catalog.vectors is not None and catalog.has_vector is not None
        allowed = catalog.has_vector if mask is None else catalog.has_vector & mask
        q = np.ascontiguousarray(queries, np.float32)
        best_scores = np.full((len(q), 0), -np.inf, np.float32)
        best_rows = np.zeros((len(q), 0), np.int64)
        for start in range(0, len(catalog), BRUTE_CHUNK):
            rows = np.flatnonzero(allowed[start : start + BRUTE_CHUNK]) + start
            if not len(rows):
                continue
            scores = q @ catalog.vectors[rows].astype(np.float32).T
            best_scores = np.concatenate([best_scores, scores], axis=1)
            best_rows = np.concatenate([best_rows, np.broadcast_to(rows, scores.shape)], axis=1)
            if best_scores.shape[1] > k:
                top = np.argpartition(-best_scores, k - 1, axis=1)[:, :k]
                best_scores = np.take_along_axis(best_scores, top, axis=1)
                best_rows = np.take_along_axis(best_rows, top, axis=1)
        out = []
        for scores, rows in zip(best_scores, best_rows, strict=True):
            order = np.lexsort((rows, -scores))  # by score, ties in table order
            out.append([(int(rows[j]), float(scores[j])) for j in order])
        return out
