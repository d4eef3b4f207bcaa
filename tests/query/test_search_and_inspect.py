"""``clipbatch search`` and ``clipbatch inspect`` on local and S3 tables."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from clipbatch_flows.cli.main import main

from clipbatch.cli.inspect import INCONSISTENT
from clipbatch.config import StorageOptions, build_config
from clipbatch.query.search import TextQueryEncoder, search
from clipbatch.synthetic import write_webdataset
from clipbatch.tables.table import open_table
from clipbatch.tables.vectors import embedding_matrix, normalize_rows
from tests.conftest import upload_dir

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def table_dir(prefect_harness, tmp_path_factory) -> Path:
    """A small output table written by the flow, on local disk (tests copy it to tamper)."""
    from clipbatch_flows.embed import embed_dataset

    root = tmp_path_factory.mktemp("cliquery")
    write_webdataset(root / "wds", shards=2, per_shard=12, seed=11, size=64)
    dest = root / "emb"
    config = build_config(
        {
            "source": {"url": str(root / "wds"), "kind": "webdataset"},
            "sink": {"url": str(dest)},
            "model": {"name": "tiny"},
            "runtime": {"device": "cpu", "batch_size": 32, "task_retries": 0},
        }
    )
    assert embed_dataset(config)["shards_committed"] == 2
    return dest


@pytest.fixture
def copy_of(table_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "emb"
    shutil.copytree(table_dir, dest)
    return dest


def test_search_ranks_every_image_by_cosine_across_shards(table_dir: Path) -> None:
    output = open_table(str(table_dir))
    [hits] = search(output, ["a red circle"], k=output.rows)
    table = output.read_all()
    img, _ = embedding_matrix(table.column("image_embedding"))
    query = TextQueryEncoder(output, "cpu")(["a red circle"])[0]
    expected = np.argsort(-(normalize_rows(img) @ query), kind="stable")
    keys = table.column("key").to_pylist()
    assert [h.key for h in hits] == [keys[i] for i in expected]
    assert [h.rank for h in hits] == list(range(1, output.rows + 1))
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True) and -1 <= scores[-1] <= scores[0] <= 1


def test_search_cli_local(table_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            ["search", "a red circle", "a large blue square", "--table", str(table_dir), "-k", "3"]
        )
        == 0
    )
    out = capsys.readouterr().out
    [hits_red, hits_blue] = search(
        open_table(str(table_dir)), ["a red circle", "a large blue square"], k=3
    )
    for hit in [*hits_red, *hits_blue]:
        assert f"{hit.score:+.3f}  {hit.key}  {hit.caption}" in out
    assert out.index("'a red circle'") < out.index(hits_red[0].key)
    assert "model tiny" in out


def test_search_cli_s3_by_flag_and_by_environment(
    table_dir: Path,
    s3_bucket: str,
    s3_endpoint: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = upload_dir(table_dir, s3_bucket, "emb", s3_endpoint)
    [local] = search(open_table(str(table_dir)), ["a green triangle"], k=4)
    [remote] = search(
        open_table(url, StorageOptions(endpoint_url=s3_endpoint)), ["a green triangle"], k=4
    )
    assert remote == local

    assert (
        main(
            ["search", "a green triangle", "--table", url, "--endpoint-url", s3_endpoint, "-k", "4"]
        )
        == 0
    )
    by_flag = capsys.readouterr().out
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    assert main(["search", "a green triangle", "--table", url, "-k", "4"]) == 0
    by_env = capsys.readouterr().out
    for hit in local:
        assert hit.key in by_flag and hit.key in by_env


def test_inspect_reports_a_consistent_table(
    table_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(table_dir)]) == 0
    out = capsys.readouterr().out
    sha = open_table(str(table_dir)).model_metadata()["checkpoint_sha256"]
    assert "shards:   2" in out and "rows:     24" in out
    assert "status:   ok=24" in out
    assert "dtype:    float16; dim 64" in out
    assert f"model:    tiny (checkpoint sha256 {sha})" in out
    lo, hi = (float(x) for x in out.split("norms:")[1].split("\n")[0].split(".."))
    assert 0.99 < lo <= hi < 1.01
    assert "result:   consistent" in out


def rewrite(path: Path, change) -> None:
    """Rewrite one shard file, keeping its footer metadata (which then no longer fits)."""
    footer = {k: v for k, v in pq.read_metadata(path).metadata.items() if k != b"ARROW:schema"}
    table = change(pq.read_table(path))
    pq.write_table(table.replace_schema_metadata(footer), path)


def test_inspect_fails_on_a_non_unit_norm(
    copy_of: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def scale(table):
        img, _ = embedding_matrix(table.column("image_embedding"))
        img[3] *= 2
        typ = table.schema.field("image_embedding").type
        flat = pa.array(img.astype(np.float16).ravel())
        column = pa.FixedSizeListArray.from_arrays(flat, typ.list_size)
        return table.set_column(
            table.schema.get_field_index("image_embedding"), "image_embedding", column
        )

    rewrite(copy_of / "00001.parquet", scale)
    assert main(["inspect", str(copy_of)]) == INCONSISTENT
    out = capsys.readouterr().out
    assert "00001.parquet: 1 image_embedding vectors are not unit length" in out
    assert "INCONSISTENT" in out


def test_inspect_fails_on_a_row_count_that_differs_from_the_metadata(
    copy_of: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rewrite(copy_of / "00000.parquet", lambda t: t.slice(0, t.num_rows - 1))
    assert main(["inspect", str(copy_of)]) == INCONSISTENT
    out = capsys.readouterr().out
    assert "00000.parquet: 11 rows, but its metadata says 12" in out
    assert "commit index says shard 00000 has 12 rows, its file 11" in out


def test_inspect_fails_on_a_duplicate_key(
    copy_of: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def duplicate_first_key(table):
        keys = table.column("key").to_pylist()
        keys[1] = keys[0]
        return table.set_column(0, table.schema.field("key"), [keys])

    rewrite(copy_of / "00000.parquet", duplicate_first_key)
    assert main(["inspect", str(copy_of)]) == INCONSISTENT
    out = capsys.readouterr().out
    assert "appears 2 times" in out


def test_inspect_fails_on_a_failed_row_that_carries_a_vector(
    copy_of: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail_row(table):
        status = table.column("status").to_pylist()
        status[0] = "decode_error"
        idx = table.schema.get_field_index("status")
        return table.set_column(idx, table.schema.field("status"), [status])

    rewrite(copy_of / "00001.parquet", fail_row)
    assert main(["inspect", str(copy_of)]) == INCONSISTENT
    out = capsys.readouterr().out
    assert "00001.parquet: 1 failed rows carry an image_embedding vector" in out
    assert "status counts" in out


def test_inspect_and_search_refuse_a_missing_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_answers_text_queries_from_its_table(
    prefect_harness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from clipbatch_flows.cli.demo import DEMO_QUERIES

    argv = ["demo", "--dir", str(tmp_path), "--shards", "1", "--per-shard", "12"]
    assert main([*argv, "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "trained on synthetic shapes" in out
    section = out.split("search:", 1)[1]
    hits = search(open_table(str(tmp_path / "embeddings")), list(DEMO_QUERIES), k=3)
    for query, top in zip(DEMO_QUERIES, hits, strict=True):
        assert repr(query) in section
        for hit in top:
            assert f"{hit.score:+.3f}  {hit.key}  {hit.caption}" in section


def test_inspect_applies_the_keep_rule_per_column(
    copy_of: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A caption problem keeps the image vector (fine) but not the text vector (flagged);
    a similarity without both vectors is flagged too."""

    def caption_problem(table):
        status = table.column("status").to_pylist()
        status[0] = "missing_caption"
        idx = table.schema.get_field_index("status")
        table = table.set_column(idx, table.schema.field("status"), [status])
        img = table.column("image_embedding").combine_chunks()
        nulls = pa.array([i == 1 for i in range(table.num_rows)])
        values = img.values
        masked = pa.FixedSizeListArray.from_arrays(values, img.type.list_size, mask=nulls)
        return table.set_column(
            table.schema.get_field_index("image_embedding"), "image_embedding", masked
        )

    rewrite(copy_of / "00001.parquet", caption_problem)
    assert main(["inspect", str(copy_of)]) == INCONSISTENT
    out = capsys.readouterr().out
    assert "1 failed rows carry an text_embedding vector" in out and "missing_caption" in out
    assert "image_embedding vector" not in out  # missing_caption may keep its image vector
    assert "00001.parquet: 1 rows have a similarity but not both vectors" in out
