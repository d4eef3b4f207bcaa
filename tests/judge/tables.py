"""Synthetic tables in clipbatch's own schema and metadata, for judgements at scale.

Scores need vectors and a model identity, not images: these tables hold given vectors
(rows without one have zeros, as the writer stores them) and file metadata naming a
model, so a head trained on, say, ViT-L/14 vectors can be exercised without the model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.sink.schema import build_schema, encode_metadata


def write_vector_table(
    dest: Path,
    vectors: np.ndarray,
    model: dict,
    files: int = 1,
    failed: np.ndarray | None = None,
    prefix: str = "",
) -> list[str]:
    """``vectors`` ([n, D]) as ``files`` shard files under ``dest``; ``failed`` rows get
    zero vectors and a failed status. Returns the keys, in order."""
    dest.mkdir(parents=True, exist_ok=True)
    n, dim = vectors.shape
    failed = np.zeros(n, bool) if failed is None else failed
    schema = build_schema(dim, "float16", []).with_metadata(
        encode_metadata({"model": {**model, "embed_dim": dim}, "fingerprint": "synthetic"})
    )
    keys = [f"{prefix}{i:07d}" for i in range(n)]
    for f, rows in enumerate(np.array_split(np.arange(n), files)):
        stored = vectors[rows].astype(np.float16)
        stored[failed[rows]] = 0
        column = pa.FixedSizeListArray.from_arrays(pa.array(stored.ravel()), dim)
        table = pa.table(
            {
                "key": [keys[i] for i in rows],
                "source_uri": [f"synthetic://{f}"] * len(rows),
                "source_member": [str(i) for i in rows],
                "source_version": ["v1"] * len(rows),
                "caption": [f"caption {i}" for i in rows],
                "caption_truncated": [False] * len(rows),
                "image_sha256": [bytes(32)] * len(rows),
                "width": pa.array([8] * len(rows), pa.int32()),
                "height": pa.array([8] * len(rows), pa.int32()),
                "status": ["missing_image" if failed[i] else "ok" for i in rows],
                "error": [None] * len(rows),
                "image_embedding": column,
                "text_embedding": column,
                "similarity": pa.array([None] * len(rows), pa.float32()),
            },
            schema=schema,
        )
        pq.write_table(table, dest / f"{f:05d}.parquet")
    return keys


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
