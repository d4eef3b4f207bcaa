"""Text -> image search over a table, with the model that wrote it.

The model is the one named in the files' ``clipbatch`` metadata, loaded by name and
checked against the recorded checkpoint sha256, so a query is always encoded by the
model that wrote the vectors.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from clipbatch.config import StorageOptions
from clipbatch.errors import ConfigError
from clipbatch.query.model import Recorded, TableModel
from clipbatch.tables.table import OutputTable, TableError, open_tables
from clipbatch.tables.vectors import embedding_matrix, normalize_rows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    query: str
    rank: int
    key: str
    caption: str | None
    score: float  # cosine similarity
    table: str = ""  # the partition table under the searched root ("" for the root itself)

    @property
    def where(self) -> str:
        return f"{self.table}/{self.key}" if self.table else self.key


class TextQueryEncoder:
    """Encodes text queries with the table's own model (:class:`TableModel`): the one it
    was written with, at its recorded precision and caption limit.

    ``table`` is the table, or the model metadata its files (or a kNN index) recorded.
    """

    def __init__(
        self,
        table: OutputTable | dict[str, Any],
        device: str = "cpu",
        storage: StorageOptions | None = None,
    ) -> None:
        if isinstance(table, OutputTable):
            self.model = TableModel.of(table, device, storage)
        else:
            self.model = TableModel(Recorded.of(table), device, storage)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode_texts(texts)[0]


@dataclass(frozen=True)
class SearchMethod:
    """How a search was answered, for the user to see."""

    kind: str  # "knn" | "brute force"
    detail: str
    stale: bool = False
    model: dict[str, Any] | None = None  # the model that encoded the queries (the table's)


def search(
    table: OutputTable | list[OutputTable],
    queries: Sequence[str],
    k: int = 5,
    device: str = "cpu",
    storage: StorageOptions | None = None,
    names: list[str] | None = None,
) -> list[list[Hit]]:
    """Top-``k`` images for each text query, by cosine: brute force, one file at a time.

    ``names`` labels each table's hits (the partition tables of a root)."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    tables = table if isinstance(table, list) else [table]
    names = names or [""] * len(tables)
    q = TextQueryEncoder(_one_model(tables), device, storage)(queries)
    heaps: list[list[tuple[float, int, str, str | None, str]]] = [[] for _ in queries]
    seq = 0
    parts = (
        (name, part)
        for t, name in zip(tables, names, strict=True)
        for part in t.iter_tables(["key", "caption", "image_embedding"])
    )
    for name, part in parts:
        emb, valid = embedding_matrix(part.column("image_embedding"))
        if not valid.any():
            seq += part.num_rows
            continue
        idx = np.flatnonzero(valid)
        scores = q @ normalize_rows(emb[idx]).T  # [queries, rows]
        keys = part.column("key").to_pylist()
        captions = part.column("caption").to_pylist()
        for qi in range(len(queries)):
            top = np.argsort(-scores[qi])[:k]
            for j in top:
                row = int(idx[j])
                # seq breaks ties in table order, so results are deterministic.
                item = (float(scores[qi, j]), -seq - row, keys[row], captions[row], name)
                if len(heaps[qi]) < k:
                    heapq.heappush(heaps[qi], item)
                else:
                    heapq.heappushpop(heaps[qi], item)
        seq += part.num_rows
    return [
        [
            Hit(queries[qi], r + 1, key, cap, score, name)
            for r, (score, _, key, cap, name) in enumerate(sorted(heaps[qi], reverse=True))
        ]
        for qi in range(len(queries))
    ]


def search_root(
    root: str,
    queries: Sequence[str],
    k: int = 5,
    device: str = "cpu",
    storage: StorageOptions | None = None,
    use_index: bool = True,
    nprobe: int | None = None,
) -> tuple[list[list[Hit]], SearchMethod]:
    """Search the table(s) under ``root``: with its kNN index when it has one (and say so,
    stale or not), else brute force over every table.

    Example::

        from clipbatch.query.search import search_root

        hits, method = search_root("emb/", ["a red circle"], k=5)
        for hit in hits[0]:
            print(hit.score, hit.key, hit.caption)
        method.kind  # 'knn' with an index under emb/_knn/, else 'brute force'
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    index = None
    if use_index:
        from clipbatch.knn.search import open_index

        index = open_index(root, "image", storage, nprobe)
    if index is None:
        tables = open_tables(root, storage)
        rows = sum(t.rows for t in tables)
        base = root.rstrip("/")
        names = [t.dest.rstrip("/")[len(base) :].lstrip("/") for t in tables]
        hits = search(tables, queries, k, device, storage, names)
        why = "asked to" if not use_index else "no kNN index; `clipbatch index` builds one"
        detail = f"brute force over {rows:,} rows ({why})"
        return hits, SearchMethod("brute force", detail, model=_one_model(tables))
    from clipbatch.knn.search import captions_of, index_staleness

    stale = index_staleness(root, "image", storage)
    model = index.build.info["model"]
    q = TextQueryEncoder(model, device, storage)(queries)
    found = index.search(q, k)
    captions = captions_of(root, [row for hits in found for _, row in hits], storage)
    hits = [
        [
            Hit(query, r + 1, row["key"], captions.get(row["id"]), s, row["table"])
            for r, (s, row) in enumerate(per_query)
        ]
        for query, per_query in zip(queries, found, strict=True)
    ]
    state = stale.describe() if stale is not None else "current"
    stale_now = bool(stale and stale.stale)
    return hits, SearchMethod("knn", f"{index.describe}; {state}", stale_now, model)


def _one_model(tables: list[OutputTable]) -> dict[str, Any]:
    models = {(m["name"], m["checkpoint_sha256"]) for m in (t.model_metadata() for t in tables)}
    if len(models) > 1:
        raise TableError(f"the tables were written by different models {sorted(models)}")
    return tables[0].model_metadata()
