"""Writes this folder's fixture: a table made by clipbatch before the commit index (v1).

Run once, with the code of commit af75f36 (the last release that wrote ``_manifest.json``
and fingerprint formula 1), from a checkout of that commit:

    git worktree add /tmp/v1tree af75f36
    cd /tmp/v1tree && PYTHONPATH=/tmp/v1tree python /path/to/this/make_fixture.py OUT

It embeds a small synthetic WebDataset on a moto S3 server, in bucket ``clipbatch-upgrade``
(the fingerprint hashes the source URI and the tar's ETag, an MD5 of its bytes, so the same
tars uploaded to the same keys give the same fingerprints anywhere), and saves the tars and
every object of the table: shard files, ``_manifest.json`` and ``_lineage/``.
tests/plan/test_scale.py uploads both again and checks that today's code skips every shard.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

BUCKET = "clipbatch-upgrade"
SHARDS, PER_SHARD = 3, 4


def main(out: Path) -> None:
    import boto3
    from moto.server import ThreadedMotoServer
    from prefect.testing.utilities import prefect_test_harness

    from clipbatch.config import build_config
    from clipbatch.synthetic import write_webdataset
    from flows.embed import embed_dataset

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=BUCKET)
    src = out / "src"
    write_webdataset(src, shards=SHARDS, per_shard=PER_SHARD, seed=21, size=40)
    for tar in sorted(src.glob("*.tar")):
        s3.upload_file(str(tar), BUCKET, f"v1/src/{tar.name}")
    storage = {"endpoint_url": endpoint}
    config = build_config(
        {
            "source": {"url": f"s3://{BUCKET}/v1/src/", "storage": storage},
            "sink": {"url": f"s3://{BUCKET}/v1/emb/", "storage": storage},
            "model": {"name": "tiny"},
            "runtime": {"device": "cpu", "batch_size": 4, "task_retries": 0},
        }
    )
    with prefect_test_harness():
        summary = embed_dataset(config)
    assert summary["shards_committed"] == SHARDS, summary
    for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix="v1/emb/")["Contents"]:
        target = out / "emb" / obj["Key"][len("v1/emb/") :]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read())
    server.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
