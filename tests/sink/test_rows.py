"""The writer's vectors: a row without one gets an all-zero vector, never a null, so the
column has no nulls and every Parquet client reads it; the similarity stays null unless
the row has both vectors."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from clipbatch.records import PreparedSample, RawSample, RowBlock
from clipbatch.sink.rows import block_table, embedding_array
from clipbatch.sink.schema import build_schema
from clipbatch.tables.vectors import embedding_matrix

DIM = 4


def unit_rows(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def block(statuses: list[str], has_image: list[bool], has_text: list[bool]) -> RowBlock:
    n = len(statuses)
    rows = [
        PreparedSample(RawSample(key=f"k{i}", source_member=f"k{i}.jpg", caption="c", status=s))
        for i, s in enumerate(statuses)
    ]
    img, txt = unit_rows(n, 1), unit_rows(n, 2)
    img[~np.asarray(has_image)] = np.nan  # what the encoder leaves where a row has none
    txt[~np.asarray(has_text)] = np.nan
    return RowBlock(
        rows,
        img if any(has_image) else None,
        txt if any(has_text) else None,
        np.asarray(has_image),
        np.asarray(has_text),
        [False] * n,
    )


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_rows_without_a_vector_get_zeros_not_nulls(dtype: type) -> None:
    emb = unit_rows(3)
    emb[1] = np.nan
    mask = np.array([True, False, True])
    col = embedding_array(emb, mask, DIM, dtype)
    assert col.type == pa.list_(pa.from_numpy_dtype(dtype), DIM)
    assert col.null_count == 0 and col.buffers()[0] is None  # no validity bitmap at all
    values = np.asarray(col.to_pylist(), np.float32)
    assert (values[1] == 0).all()
    np.testing.assert_allclose(values[[0, 2]], emb[[0, 2]], atol=1e-3)
    mat, valid = embedding_matrix(col)
    assert valid.tolist() == [True, False, True]


@pytest.mark.parametrize("emb", [None, np.full((3, DIM), np.nan, np.float32)])
def test_a_block_where_no_row_has_a_vector_is_all_zeros(emb: np.ndarray | None) -> None:
    col = embedding_array(emb, np.zeros(3, bool), DIM, np.float16)
    assert col.type == pa.list_(pa.float16(), DIM)
    assert col.null_count == 0 and len(col) == 3
    assert np.asarray(col.to_pylist()).tolist() == [[0.0] * DIM] * 3


def test_block_table_has_no_null_vectors_and_a_similarity_only_with_both() -> None:
    statuses = ["ok", "missing_image", "missing_caption", "unsafe_path"]
    b = block(statuses, [True, False, True, False], [True, True, False, False])
    table = block_table(b, build_schema(DIM, "float16", []), [], "src", "v1")
    for column, expected in (
        ("image_embedding", [True, False, True, False]),
        ("text_embedding", [True, True, False, False]),
    ):
        assert table.column(column).null_count == 0
        _, valid = embedding_matrix(table.column(column))
        assert valid.tolist() == expected, column
    sim = table.column("similarity").to_pylist()
    assert sim[1:] == [None, None, None]
    expected = float(b.image_embeddings[0] @ b.text_embeddings[0])
    assert sim[0] == pytest.approx(expected, abs=1e-5)


def test_block_table_of_a_block_without_any_vector() -> None:
    b = block(["unsafe_path", "bad_row"], [False, False], [False, False])
    table = block_table(b, build_schema(DIM, "float32", []), [], "src", "v1")
    for column in ("image_embedding", "text_embedding"):
        assert table.column(column).null_count == 0
        assert table.column(column).to_pylist() == [[0.0] * DIM] * 2
    assert table.column("similarity").to_pylist() == [None, None]
