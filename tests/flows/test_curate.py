"""The curate flow on moto's S3: table root and curated output both in the store.

Through a counting proxy: the kept rows' images are read in a bounded number of ranged
GETs per source tar (coalesced, never one per row), and the requests per source shard
are the same at two sizes. The artifact counts rows kept and dropped per reason.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from urllib.parse import unquote, urlsplit

import boto3
import pytest

from clipbatch.config import StorageOptions
from tests.conftest import upload_dir
from tests.curate.roots import night
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.timeout(300)


def test_the_flow_curates_on_s3_with_coalesced_reads_and_an_artifact(
    prefect_harness, s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    from clipbatch_flows.curate import CURATE_KEY, curate_flow

    from tests import prefect_readback

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    per_shard: dict[int, float] = {}
    proxy = FaultProxy(s3_endpoint).start()
    try:
        for n in (2, 6):
            local = tmp_path / f"n{n}"
            # The source in the store, embedded from there: rows point at s3:// tars.
            from clipbatch.synthetic import write_webdataset

            write_webdataset(local / "src", shards=n, per_shard=8, seed=n, size=48)
            src = upload_dir(local / "src", s3_bucket, f"src{n}", s3_endpoint)
            root = f"s3://{s3_bucket}/emb{n}"
            from tests.serve.tables import embed, tiny_config

            storage = {"endpoint_url": s3_endpoint}
            embed(tiny_config(src, f"{root}/date=2026-11-01", storage))
            via = StorageOptions(endpoint_url=proxy.url)
            spec = {
                "name": "nightly",
                "rules": {"min_similarity": None},
                "output": {"url": f"s3://{s3_bucket}/curated{n}", "rows_per_shard": 5,
                           "storage": {"endpoint_url": proxy.url}},
            }  # fmt: skip
            proxy.clear_exchanges()
            state = curate_flow(root=root, spec=spec, storage=via, return_state=True)
            report = state.result()
            assert report["kept"] == 8 * n and report["dropped"] == 0
            exchanges = proxy.recorded()
            tar_reads = [
                e for e in exchanges
                if e.method == "GET" and unquote(urlsplit(e.target).path).endswith(".tar")
            ]  # fmt: skip
            assert len(tar_reads) == n, [e.target for e in tar_reads]  # one ranged GET per tar
            per_shard[n] = len(exchanges) / n
            listed = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"curated{n}/")
            names = sorted(o["Key"].rsplit("/", 1)[-1] for o in listed.get("Contents", []))
            shards = (8 * n + 4) // 5
            assert names == sorted(
                f"{i:05d}{suffix}" for i in range(shards) for suffix in (".tar", ".parquet", "_stats.json")
            )  # fmt: skip
            pending = s3.list_multipart_uploads(Bucket=s3_bucket, Prefix=f"curated{n}/")
            assert not pending.get("Uploads")  # every staged upload completed
            body = s3.get_object(Bucket=s3_bucket, Key=f"curated{n}/00000.tar")["Body"].read()
            with tarfile.open(fileobj=io.BytesIO(body)) as tar:
                assert sorted({m.name.split(".", 1)[1] for m in tar}) == ["jpg", "json", "txt"]
    finally:
        proxy.stop()
    # Per source shard, the same requests at 2 and 6 shards (bookkeeping is per run).
    assert per_shard[6] <= per_shard[2], per_shard
    arts = {a.key: a for a in prefect_readback.artifacts(str(state.state_details.flow_run_id))}
    text = arts[CURATE_KEY].data
    assert "| kept | 48 | 100.0% |" in text and "Published 10 shard(s)" in text


def test_the_flow_counts_drops_per_reason_in_its_artifact(prefect_harness, tmp_path: Path) -> None:
    from clipbatch_flows.curate import CURATE_KEY, curate_flow

    from tests import prefect_readback

    night(tmp_path, "2026-11-01", seed=1, failures=True, shards=1)
    spec = {"name": "s", "rules": {"min_similarity": None},
            "output": {"url": str(tmp_path / "out")}}  # fmt: skip
    state = curate_flow(root=str(tmp_path / "emb"), spec=spec, return_state=True)
    report = state.result()
    assert report["reasons"] == {"status": 2} and report["kept"] == 8
    arts = {a.key: a for a in prefect_readback.artifacts(str(state.state_details.flow_run_id))}
    assert "| dropped for status | 2 | 20.0% |" in arts[CURATE_KEY].data
