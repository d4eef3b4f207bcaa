"""Issue 2 acceptance: a WebDataset on S3 (moto) embedded into Parquet by the Prefect flow."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbatch.io.storage import get_fs
from clipbatch.models.loading import load_model
from clipbatch.sink.commits.index import listed_versions, load_index
from clipbatch.sink.schema import METADATA_KEY
from clipbatch.sink.writer import read_file_metadata
from clipbatch.synthetic import write_webdataset
from tests.conftest import upload_dir
from tests.helpers import cosine, read_table, reference_embeddings, tar_samples, tiny_s3_config

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def s3_dataset(tmp_path, s3_bucket, s3_endpoint):
    local = tmp_path / "laion"
    tars = write_webdataset(local, shards=3, per_shard=10, seed=7, size=80)
    url = upload_dir(local, s3_bucket, "laion", s3_endpoint)
    return url, tars


def test_flow_embeds_webdataset_from_s3(prefect_harness, s3_dataset, s3_bucket, s3_endpoint):
    from clipbatch_flows.embed import embed_dataset

    source, tars = s3_dataset
    dest = f"s3://{s3_bucket}/emb/tiny"
    config = tiny_s3_config(source, dest, s3_endpoint)
    summary = embed_dataset(config)

    assert summary["shards_committed"] == 3 and summary["shards_failed"] == 0
    table, files = read_table(dest, s3_endpoint)
    assert files == ["00000.parquet", "00001.parquet", "00002.parquet"]
    samples = tar_samples(tars)
    assert table.num_rows == len(samples) == summary["rows_written"] == 30
    assert sorted(table.column("key").to_pylist()) == sorted(samples)
    assert set(table.column("status").to_pylist()) == {"ok"}

    # Embeddings equal stock clip calls on the same inputs, row by row (matched by key).
    loaded = load_model(config.model, "cpu")
    rows = table.to_pylist()
    for row in rows:
        sample = samples[row["key"]]
        assert row["caption"] == sample["txt"].decode()
        ref_img, ref_txt = reference_embeddings(
            loaded.model, loaded.preprocess, sample["jpg"], row["caption"]
        )
        img = np.asarray(row["image_embedding"], np.float32)
        txt = np.asarray(row["text_embedding"], np.float32)
        assert cosine(img, ref_img) > 0.999
        assert cosine(txt, ref_txt) > 0.999
        assert abs(np.linalg.norm(img) - 1) < 2e-3 and abs(np.linalg.norm(txt) - 1) < 2e-3
        assert row["similarity"] == pytest.approx(cosine(img, txt), abs=2e-3)
        assert row["source_uri"].startswith(source) and row["source_uri"].endswith(".tar")
        assert row["source_member"] == row["key"]
        assert row["source_version"].startswith(("etag:", "versionid:"))

    # Schema and file metadata as design.md §3 says.
    schema = table.schema
    for column in ("image_embedding", "text_embedding"):
        typ = schema.field(column).type
        assert pa.types.is_fixed_size_list(typ) and typ.list_size == 64
        assert typ.value_type == pa.float16()
    assert schema.field("image_sha256").type == pa.binary(32)
    assert (
        schema.field("width").type == pa.int32() and schema.field("similarity").type == pa.float32()
    )
    assert not schema.field("key").nullable
    fs, path = get_fs(dest, config.sink.storage)
    meta = json.loads(
        pq.read_metadata(f"{path}/00001.parquet", filesystem=fs).metadata[METADATA_KEY]
    )
    assert meta["model"]["checkpoint_sha256"] == loaded.checkpoint.sha256
    assert meta["model"]["embed_dim"] == 64
    assert meta["dtype"] == "float16" and meta["normalized"] is True
    assert meta["source"]["uri"].endswith("00001.tar")
    assert meta["rows"] == 10 and meta["counts"] == {"ok": 10}
    assert len(meta["fingerprint"]) == 64
    assert meta["run"]["flow_run_id"]

    # A rerun writes no second file and leaves the table unchanged.
    before = {p: fs.info(p)["ETag"] for p in fs.find(path)}
    index = load_index(config.sink, listed_versions(config.sink))
    assert sorted(index.rows) == ["00000", "00001", "00002"]
    assert {n: index.fingerprint(n) for n in index.rows} == {
        n: read_file_metadata(f"{dest}/{n}.parquet", config.sink.storage)["fingerprint"]
        for n in index.rows
    }
    again = embed_dataset(config)
    assert again["shards_skipped"] == 3 and again["shards_committed"] == 0
    after = {p: fs.info(p)["ETag"] for p in fs.find(path)}
    # Bookkeeping changes on a rerun (the new run's _lineage record).
    assert {k: v for k, v in after.items() if "/_" not in k} == {
        k: v for k, v in before.items() if "/_" not in k
    }
    assert not any("/_tmp/" in p for p in after)
