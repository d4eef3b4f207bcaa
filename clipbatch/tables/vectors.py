"""Embedding columns as numpy matrices: the one place that reads vectors back from a table."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A fixed_size_list column as float32 [n, d] (zeros where null), and its validity mask."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = arr.type.list_size
    values = arr.values.slice(arr.offset * dim, len(arr) * dim)
    mat = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), dim)
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)
    mat[~valid] = 0.0
    return mat, valid


def normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
