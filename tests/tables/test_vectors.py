"""The reader's rule: a row has no vector where its entry is null (older files) or all
zeros (from zero vectors on); one column may mix both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.tables.vectors import embedding_matrix
from tests.tables.failed_rows import EXPECTED

TYP = pa.list_(pa.float16(), 3)


def test_null_and_zero_entries_are_absent_anything_else_present() -> None:
    values = pa.array(np.array([0.6, 0.8, 0, 0, 0, 0, np.nan, 1, 0], np.float16))
    nulls = pa.array([False, False, True])  # the null's values (NaN) are not a vector
    col = pa.FixedSizeListArray.from_arrays(values, 3, mask=nulls)
    mat, valid = embedding_matrix(col)
    assert valid.tolist() == [True, False, False]
    assert (mat[1:] == 0).all() and mat.dtype == np.float32
    np.testing.assert_allclose(mat[0], [0.6, 0.8, 0.0], atol=1e-3)


def test_one_column_may_mix_null_and_zero_chunks_and_slices() -> None:
    old = pa.array([[1, 0, 0], None], TYP)
    new = pa.array([[0, 0, 0], [0, 0, 2], [0, 0, 0]], TYP)
    mixed = pa.chunked_array([old, new.slice(1)])
    _, valid = embedding_matrix(mixed)
    assert valid.tolist() == [True, False, True, False]
    assert embedding_matrix(pa.chunked_array([], TYP))[1].shape == (0,)


def test_a_tiny_nonzero_component_is_a_vector() -> None:
    col = pa.array([[0, 0, 6e-8]], TYP)  # the smallest float16 above zero
    assert embedding_matrix(col)[1].tolist() == [True]


def test_new_and_old_tables_read_the_same(failed_rows_table: Path, old_table: Path) -> None:
    for name in ("00000.parquet", "00001.parquet"):
        new, old = pq.read_table(failed_rows_table / name), pq.read_table(old_table / name)
        keys = new.column("key").to_pylist()
        for i, column in ((1, "image_embedding"), (2, "text_embedding")):
            assert new.column(column).null_count == 0
            assert old.column(column).null_count > 0
            mat_new, valid_new = embedding_matrix(new.column(column))
            mat_old, valid_old = embedding_matrix(old.column(column))
            assert valid_new.tolist() == [EXPECTED[k][i] for k in keys], column
            assert (valid_old == valid_new).all()
            assert (mat_old == mat_new).all()
