"""A golden run: fingerprints and Parquet data of a small run are pinned.

Recorded before the layout of issue 17 moved every module; a refactor must not change
what a run writes. The source is the fixed tars of tests/data/upgrade-v1/src on moto, in
a fixed bucket (the fingerprint hashes the URI and the ETag, an MD5 of the bytes), so
fingerprints are the same on every machine. Columns other than the embeddings are
compared byte for byte (their Arrow IPC serialisation); embeddings and similarity within
2e-3, the float16 rounding a different summation order in the CPU's BLAS can flip.

``CLIPBATCH_GOLDEN_WRITE=1`` records tests/data/golden.json again (only on purpose); that
run compares nothing and is reported as skipped, so it can never pass as a check.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pytest

from tests.helpers import read_table, tiny_s3_config

pytestmark = pytest.mark.timeout(240)

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden.json"
BUCKET = "clipbatch-golden"
NUMERIC = ("image_embedding", "text_embedding", "similarity")


def column_digest(column: pa.ChunkedArray) -> str:
    sink = pa.BufferOutputStream()
    table = pa.table({"c": column.combine_chunks()})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def test_a_small_run_writes_exactly_what_it_wrote_before(prefect_harness, s3_endpoint):
    from clipbatch_flows.embed import embed_dataset

    from clipbatch.sink.writer import read_file_metadata

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=BUCKET)
    for tar in sorted((DATA / "upgrade-v1" / "src").glob("*.tar")):
        s3.upload_file(str(tar), BUCKET, f"src/{tar.name}")
    dest = f"s3://{BUCKET}/emb/"
    config = tiny_s3_config(
        f"s3://{BUCKET}/src/", dest, s3_endpoint, batch_size=4, sink={"overwrite": True}
    )
    summary = embed_dataset(config)
    assert summary["shards_committed"] == 3
    table, files = read_table(dest, s3_endpoint)
    got = {
        "files": files,
        "fingerprints": {
            f: read_file_metadata(f"{dest}{f}", config.sink.storage)["fingerprint"] for f in files
        },
        "schema": [f"{f.name}: {f.type}" for f in table.schema],
        "columns": {
            name: column_digest(table.column(name))
            for name in table.column_names
            if name not in NUMERIC
        },
        "numeric": {
            name: [
                None if v is None else np.asarray(v, np.float32).round(4).tolist()
                for v in table.column(name).to_pylist()
            ]
            for name in NUMERIC
        },
    }
    if os.environ.get("CLIPBATCH_GOLDEN_WRITE") == "1":
        # Recording compares nothing: say so, rather than pass comparing the file with
        # itself. A CI that sets the variable gets a skip it can see, never a green check.
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
        pytest.skip(f"recorded {GOLDEN} (CLIPBATCH_GOLDEN_WRITE=1): nothing was compared")
    want = json.loads(GOLDEN.read_text())
    assert got["files"] == want["files"]
    assert got["fingerprints"] == want["fingerprints"]
    assert got["schema"] == want["schema"]
    assert got["columns"] == want["columns"], [
        c for c in want["columns"] if got["columns"].get(c) != want["columns"][c]
    ]
    for name in NUMERIC:
        for i, (g, w) in enumerate(zip(got["numeric"][name], want["numeric"][name], strict=True)):
            assert (g is None) == (w is None), (name, i)
            if g is not None:
                np.testing.assert_allclose(g, w, atol=2e-3, rtol=0, err_msg=f"{name}[{i}]")
