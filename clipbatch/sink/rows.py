"""Rows to Arrow: the table's columns for one block of encoded rows (docs/design.md §3)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from clipbatch.records import RowBlock


def block_table(
    block: RowBlock,
    schema: pa.Schema,
    passthrough: list[pa.Field],
    source_uri: str,
    source_version: str,
) -> pa.Table:
    """The Arrow table of ``block``'s rows, in ``schema`` (one input row, one output row)."""
    rows = block.rows
    n = len(rows)
    dim = schema.field("image_embedding").type.list_size
    value_dtype = (
        np.float16
        if schema.field("image_embedding").type.value_type == pa.float16()
        else np.float32
    )
    cols: dict[str, Any] = {
        "key": [r.raw.key for r in rows],
        "source_uri": [source_uri] * n,
        "source_member": [r.raw.source_member for r in rows],
        "source_version": [source_version] * n,
        "caption": [r.raw.caption for r in rows],
        "caption_truncated": [
            (t if r.raw.caption is not None else None)
            for r, t in zip(rows, block.truncated, strict=True)
        ],
        "image_sha256": [r.image_sha256 for r in rows],
        "width": [r.width for r in rows],
        "height": [r.height for r in rows],
        "status": [r.raw.status for r in rows],
        "error": [r.raw.error for r in rows],
        "image_embedding": embedding_array(
            block.image_embeddings, block.has_image, dim, value_dtype
        ),
        "text_embedding": embedding_array(block.text_embeddings, block.has_text, dim, value_dtype),
        "similarity": similarity(block),
    }
    for field in passthrough:
        cols[field.name] = [r.raw.extra.get(field.name) for r in rows]
    arrays = [
        value if isinstance(value, pa.Array) else pa.array(value, type=field.type)
        for field, value in ((f, cols[f.name]) for f in schema)
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def embedding_array(emb: np.ndarray | None, mask: np.ndarray, dim: int, dtype: type) -> pa.Array:
    """A fixed_size_list column with no nulls: all zeros where ``mask`` is false.

    A row without a vector gets a zero vector, never a null: every Parquet client reads
    a fixed_size_list column without nulls (pyarrow < 26, pandas, embedding-reader and
    autofaiss cannot read one with them), and an embedding is never all zeros, so the
    zeros still say "absent" (:func:`clipbatch.tables.vectors.embedding_matrix`).

    >>> import numpy as np
    >>> emb = np.array([[0.6, 0.8], [np.nan, np.nan]], np.float32)
    >>> col = embedding_array(emb, np.array([True, False]), 2, np.float16)
    >>> col.null_count, col.to_pylist()
    (0, [[0.60009765625, 0.7998046875], [0.0, 0.0]])
    """
    n = len(mask)
    if emb is None or not mask.any():
        values = np.zeros(n * dim, dtype)
    else:
        values = np.where(mask[:, None], emb, 0).astype(dtype, copy=False).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(values), dim)


def similarity(block: RowBlock) -> pa.Array:
    """Cosine of image and text, as LAION and DataComp filter by; null unless both exist."""
    n = len(block.rows)
    both = block.has_image & block.has_text
    if block.image_embeddings is None or block.text_embeddings is None or not both.any():
        return pa.nulls(n, type=pa.float32())
    a = block.image_embeddings.astype(np.float32)
    b = block.text_embeddings.astype(np.float32)
    sim = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return pa.array(sim.astype(np.float32), mask=~both)
