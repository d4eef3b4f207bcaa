"""A table with failed rows, read by the clients users read it with (this venv's
versions): pyarrow, pandas, polars, DuckDB and LanceDB's default ``create_table``.
Each sees every row, zero vectors exactly where a row has none, and filters on status.

An old table (null vectors, the previous writer's) is read by clipbatch's own readers:
vectors, ``clipbatch inspect``'s checks and the kNN index's reader.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbatch.tables.table import open_table
from tests.tables.failed_rows import EXPECTED

COLUMNS = {"image_embedding": 1, "text_embedding": 2}  # index into EXPECTED's tuples
OK_KEYS = [k for k, (status, _, _) in EXPECTED.items() if status == "ok"]


def assert_vectors(keys: list[str], column: str, matrix: np.ndarray) -> None:
    """Zero vectors exactly on the rows EXPECTED says have none."""
    assert matrix.shape == (len(EXPECTED), 64), column
    zero = ~np.asarray(matrix, np.float32).any(axis=1)
    assert {k: not z for k, z in zip(keys, zero, strict=True)} == {
        k: v[COLUMNS[column]] for k, v in EXPECTED.items()
    }, column


def shard_files(table: Path) -> list[str]:
    return [str(p) for p in sorted(table.glob("*.parquet"))]


def test_pyarrow(failed_rows_table: Path) -> None:
    table = pq.read_table(failed_rows_table)  # the folder: _commits/ is skipped
    assert table.num_rows == len(EXPECTED)
    for column in COLUMNS:
        col = table.column(column)
        assert col.type == pa.list_(pa.float16(), 64) and col.null_count == 0
        flat = pa.concat_arrays([c.flatten() for c in col.chunks])
        matrix = flat.to_numpy(zero_copy_only=False).reshape(-1, 64)
        assert_vectors(table.column("key").to_pylist(), column, matrix)
    ok = pq.read_table(failed_rows_table, filters=[("status", "=", "ok")])
    assert ok.column("key").to_pylist() == OK_KEYS


def test_pandas(failed_rows_table: Path) -> None:
    import pandas as pd

    df = pd.read_parquet(failed_rows_table)
    assert len(df) == len(EXPECTED)
    for column in COLUMNS:
        matrix = np.stack(df[column].to_numpy())
        assert matrix.dtype == np.float16
        assert_vectors(df["key"].tolist(), column, matrix)
    assert df[df["status"] == "ok"]["key"].tolist() == OK_KEYS


def test_polars(failed_rows_table: Path) -> None:
    import polars as pl

    df = pl.read_parquet(shard_files(failed_rows_table))
    assert df.height == len(EXPECTED)
    for column in COLUMNS:
        assert df.schema[column] == pl.Array(pl.Float16, 64)
        assert df[column].null_count() == 0
        assert_vectors(df["key"].to_list(), column, df[column].to_numpy())
    assert df.filter(pl.col("status") == "ok")["key"].to_list() == OK_KEYS


def test_duckdb(failed_rows_table: Path) -> None:
    import duckdb

    files = str(failed_rows_table / "*.parquet")
    con = duckdb.connect()
    rows = con.sql(
        f"select key, image_embedding, text_embedding from '{files}' order by filename, file_row_number"
    ).fetchall()
    keys = [r[0] for r in rows]
    assert keys == list(EXPECTED)
    for i, column in enumerate(COLUMNS, start=1):
        assert_vectors(keys, column, np.asarray([r[i] for r in rows], np.float32))
    # DuckDB reads float16 as FLOAT[]: cast to FLOAT[64] for the array functions. A zero
    # vector's cosine is NaN, and NaN sorts above every number: filter on status.
    query = f"(select image_embedding::FLOAT[64] from '{files}' where key = 'good-1')"
    top = con.sql(
        f"select key, array_cosine_similarity(image_embedding::FLOAT[64], {query}) as s "
        f"from '{files}' where status = 'ok' order by s desc"
    ).fetchall()
    assert top[0] == ("good-1", pytest.approx(1.0, abs=1e-3))
    assert sorted(k for k, _ in top) == sorted(OK_KEYS)
    nan = con.sql(
        f"select count(*) from '{files}' where isnan(array_cosine_similarity("
        f"image_embedding::FLOAT[64], {query}))"
    ).fetchall()[0][0]
    assert nan == sum(not has_image for _, has_image, _ in EXPECTED.values())


def test_lancedb_default_create_table(failed_rows_table: Path) -> None:
    import lancedb

    table = pq.read_table(failed_rows_table)
    with tempfile.TemporaryDirectory() as folder:
        db = lancedb.connect(folder)
        tbl = db.create_table("emb", data=table)  # the defaults: no schema, no options
        assert tbl.count_rows() == len(EXPECTED)
        for column in COLUMNS:
            assert tbl.schema.field(column).type == pa.list_(pa.float16(), 64)
        back = tbl.to_arrow()
        for column in COLUMNS:
            flat = back.column(column).combine_chunks().flatten()
            matrix = flat.to_numpy(zero_copy_only=False).reshape(-1, 64)
            assert_vectors(back.column("key").to_pylist(), column, matrix)
        query = np.asarray(table.column("image_embedding")[2].as_py(), np.float32)  # good-1
        hits = (
            tbl.search(query, vector_column_name="image_embedding")
            .where("status = 'ok'", prefilter=True)
            .limit(len(EXPECTED))
            .to_list()
        )
        assert hits[0]["key"] == "good-1" and hits[0]["_distance"] == pytest.approx(0, abs=1e-3)
        assert sorted(h["key"] for h in hits) == sorted(OK_KEYS)
        # Unfiltered, an L2 search ranks zero vectors at distance 1 (a unit vector's
        # squared norm): closer than unrelated vectors. Readers filter on status.
        unfiltered = tbl.search(query, vector_column_name="image_embedding").limit(3).to_list()
        assert unfiltered[1]["status"] != "ok"


# -- an old table (null vectors), read by clipbatch's own readers ----------------------


def test_clipbatch_readers_read_an_old_table_with_null_vectors(old_table: Path) -> None:
    from clipbatch.knn.vectors import read_vectors
    from clipbatch.query.validate import validate
    from clipbatch.tables.snapshot import snapshot
    from clipbatch.tables.vectors import embedding_matrix

    for column, i in COLUMNS.items():
        table = pq.read_table(old_table, columns=["key", column])
        assert table.column(column).null_count == sum(not v[i] for v in EXPECTED.values())
        _, valid = embedding_matrix(table.column(column))
        assert valid.tolist() == [EXPECTED[k][i] for k in table.column("key").to_pylist()]
    report = validate(open_table(str(old_table)))
    assert report.ok, report.problems
    assert report.rows == len(EXPECTED) and 0.99 < report.norm_min <= report.norm_max < 1.01
    snap = snapshot(str(old_table))
    for column, i in COLUMNS.items():
        keys = [k for f in snap.files for k in read_vectors(snap, f, column).keys]
        assert keys == [k for k, v in EXPECTED.items() if v[i]], column


def _with_status(src: Path, dest: Path, key: str, status: str) -> Path:
    """A copy of the table where row ``key`` has another status (footer kept)."""
    import shutil

    shutil.copytree(src, dest)
    for path in sorted(dest.glob("*.parquet")):
        table = pq.read_table(path)
        statuses = [
            status if k == key else s
            for k, s in zip(
                table.column("key").to_pylist(), table.column("status").to_pylist(), strict=True
            )
        ]
        footer = {k: v for k, v in pq.read_metadata(path).metadata.items() if k != b"ARROW:schema"}
        idx = table.schema.get_field_index("status")
        table = table.set_column(idx, table.schema.field("status"), [statuses])
        pq.write_table(table.replace_schema_metadata(footer), path)
    return dest


def test_inspect_accepts_zeros_and_flags_a_nonzero_vector_on_a_failed_row(
    failed_rows_table: Path, old_table: Path, tmp_path: Path
) -> None:
    from clipbatch.query.validate import validate

    for table in (failed_rows_table, old_table):
        report = validate(open_table(str(table)))
        assert report.ok, report.problems
    # good-0 has both vectors; as unsafe_path it may have neither.
    bad = _with_status(failed_rows_table, tmp_path / "bad", "good-0", "unsafe_path")
    problems = validate(open_table(str(bad))).problems
    assert any("failed rows carry an image_embedding vector" in p for p in problems), problems
    assert any("failed rows carry an text_embedding vector" in p for p in problems), problems
    # no-image has a zero image vector and a text vector: decode_error allows exactly that
    # (only the footer's status counts now differ).
    fine = _with_status(failed_rows_table, tmp_path / "fine", "no-image", "decode_error")
    problems = validate(open_table(str(fine))).problems
    assert problems and not any("carry" in p for p in problems), problems
