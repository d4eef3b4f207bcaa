"""Reads run inside ``.venv-floor`` (pyarrow at the declared floor, numpy 1.x, pandas
< 2.3, autofaiss 2.18, embedding-reader); each prints one JSON line for the test.

``python -m tests.tables.floor_reads read TABLE``: pyarrow and pandas read a table.
``python -m tests.tables.floor_reads index FOLDER``: embedding-reader and autofaiss on a
folder of table files (Parquet, ``image_embedding``).
``python -m tests.tables.floor_reads index-export DIR``: the same on ``clipbatch export``'s
output (npy + metadata).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np

COLUMNS = ("image_embedding", "text_embedding")


def versions() -> dict[str, str]:
    names = ("pyarrow", "numpy", "pandas", "autofaiss", "embedding-reader", "faiss-cpu")
    return {n: version(n) for n in names}


def read(table: str) -> dict:
    """Every shard file through pyarrow and pandas (``np.stack`` of the vector column)."""
    import pandas as pd
    import pyarrow.parquet as pq

    files = sorted(Path(table).glob("*.parquet"))
    arrow = [pq.read_table(f) for f in files]
    frames = [pd.read_parquet(f) for f in files]
    df = pd.concat(frames, ignore_index=True)
    out: dict = {
        "versions": versions(),
        "rows": sum(t.num_rows for t in arrow),
        "keys": df["key"].tolist(),
        "ok_keys": df[df["status"] == "ok"]["key"].tolist(),
        "filtered": [
            k
            for f in files
            for k in pq.read_table(f, filters=[("status", "=", "ok")]).column("key").to_pylist()
        ],
        "nulls": {c: sum(t.column(c).null_count for t in arrow) for c in COLUMNS},
        "arrow_types": sorted({str(t.schema.field(c).type) for t in arrow for c in COLUMNS}),
    }
    for column in COLUMNS:
        matrix = np.stack(df[column].to_numpy())
        out[f"{column}.dtype"] = str(matrix.dtype)
        out[f"{column}.shape"] = list(matrix.shape)
        out[f"{column}.present"] = matrix.astype(np.float32).any(axis=1).tolist()
    return out


def _autofaiss(embeddings: str, file_format: str, work: str, **kw: object):
    from autofaiss import build_index

    index, info = build_index(
        embeddings=embeddings,
        file_format=file_format,
        index_path=f"{work}/knn.index",
        index_infos_path=f"{work}/infos.json",
        save_on_disk=True,
        max_index_memory_usage="100MB",
        current_memory_available="1G",
        nb_cores=1,
        verbose=logging.ERROR,
        **kw,
    )
    if index is None:
        raise RuntimeError(f"autofaiss built no index: {info}")
    return index


def index(folder: str) -> dict:
    """embedding-reader reads the Parquet files; autofaiss indexes their image vectors."""
    import pandas as pd
    from embedding_reader import EmbeddingReader

    reader = EmbeddingReader(
        folder, file_format="parquet", embedding_column="image_embedding", meta_columns=["key"]
    )
    batches = list(reader(batch_size=1000, show_progress=False))
    emb = np.concatenate([e for e, _ in batches])
    keys = [k for _, m in batches for k in m["key"].tolist()]
    with tempfile.TemporaryDirectory() as work:
        idx = _autofaiss(
            folder,
            "parquet",
            work,
            embedding_column_name="image_embedding",
            id_columns=["key"],
            ids_path=f"{work}/ids",
        )
        ids = pd.concat(pd.read_parquet(p) for p in sorted(Path(work, "ids").glob("*.parquet")))
        by_id = dict(zip(ids["i"], ids["key"], strict=True))
        query = emb[keys.index("good-1")].astype(np.float32)[None]
        _, found = idx.search(query, 3)
        return {
            "versions": versions(),
            "count": int(reader.count),
            "dimension": int(reader.dimension),
            "dtype": str(emb.dtype),
            "keys": keys,
            "present": emb.astype(np.float32).any(axis=1).tolist(),
            "ntotal": int(idx.ntotal),
            "top": [by_id[int(i)] for i in found[0]],
        }


def index_export(out: str) -> dict:
    """embedding-reader joins the npy files with their metadata; autofaiss indexes the
    image and text vectors."""
    from embedding_reader import EmbeddingReader

    result: dict = {"versions": versions()}
    for folder in ("img_emb", "text_emb"):
        reader = EmbeddingReader(
            f"{out}/{folder}",
            file_format="parquet_npy",
            metadata_folder=f"{out}/metadata",
            meta_columns=["image_path", "caption", "key"],
        )
        batches = list(reader(batch_size=1000, show_progress=False))
        emb = np.concatenate([e for e, _ in batches])
        keys = [k for _, m in batches for k in m["key"].tolist()]
        paths = [k for _, m in batches for k in m["image_path"].tolist()]
        with tempfile.TemporaryDirectory() as work:
            idx = _autofaiss(f"{out}/{folder}", "npy", work)
            query = emb[keys.index("good-1")].astype(np.float32)[None]
            scores, found = idx.search(query, 3)
        result[folder] = {
            "count": int(reader.count),
            "dtype": str(emb.dtype),
            "keys": keys,
            "paths_are_keys": paths == keys,
            "norms": [float(n) for n in np.linalg.norm(emb.astype(np.float32), axis=1)],
            "ntotal": int(idx.ntotal),
            "top": [keys[int(i)] for i in found[0]],
            "top_score": float(scores[0][0]),
        }
    return result


if __name__ == "__main__":
    command, path = sys.argv[1], sys.argv[2]
    run = {"read": read, "index": index, "index-export": index_export}[command]
    print(json.dumps(run(path)))
