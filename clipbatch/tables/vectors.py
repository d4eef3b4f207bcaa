"""Embedding columns as numpy matrices: the one place that reads vectors back from a table.

A row has no vector exactly when its entry is null (tables written before zero vectors)
or all zeros (from then on). One table may hold both kinds of files; this module reads
either, so no other module decides from the Arrow column whether a vector is present.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A fixed_size_list column as float32 [n, d] (zeros where absent), and its validity mask.

    A vector is absent where the entry is null or all zeros: an embedding is never all
    zeros (an L2-normalised one has norm 1), so the writer stores zeros for rows that have
    none (:func:`clipbatch.sink.rows.embedding_array`); older files store nulls.

    >>> import pyarrow as pa
    >>> values = pa.array([0.6, 0.8, 0.0, 0.0, 1.0, 0.0], pa.float32())
    >>> zeros = pa.FixedSizeListArray.from_arrays(values, 2)  # zeros: absent
    >>> nulls = pa.array([[0.6, 0.8], None, [1.0, 0.0]], pa.list_(pa.float32(), 2))
    >>> [embedding_matrix(col)[1].tolist() for col in (zeros, nulls)]
    [[True, False, True], [True, False, True]]
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = arr.type.list_size
    values = arr.values.slice(arr.offset * dim, len(arr) * dim)
    mat = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), dim)
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)
    mat[~valid] = 0.0  # the values under a null are unspecified (NaN, from older writers)
    valid &= mat.any(axis=1)
    return mat, valid


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Each row scaled to unit L2 norm (an all-zero row stays zero).

    >>> import numpy as np
    >>> normalize_rows(np.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6, 0.8], [0.0, 0.0]]
    """
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
