"""A table written through a credentials block gets its kNN index, on a real server.

The worker's environment has no AWS variables: the embed run and the index build it
triggers reach the store through the block alone. The block's *name* travels in the run
record and in the ``clipbatch.run.completed`` event (a reference, not a secret), so the
trigger's parameters validate and the build runs; its values appear nowhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import httpx
import pytest

from clipbatch.synthetic import write_webdataset
from tests.paths import REPO
from tests.prefect_server import PrefectServer, prefect_server, stop

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def without_aws(env: dict[str, str]) -> dict[str, str]:
    return {
        k: v for k, v in env.items() if not k.startswith("AWS_") or k == "AWS_EC2_METADATA_DISABLED"
    }


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrefectServer]:
    with prefect_server(tmp_path / "prefect-home") as s:
        yield s


def wait_final(api: httpx.Client, run_id: str, log: Path, timeout: float = 240) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = api.get(f"/flow_runs/{run_id}").json()
        if run["state_type"] in FINAL:
            assert run["state_type"] == "COMPLETED", (run["state"], log.read_text()[-6000:])
            return run
        time.sleep(1)
    raise AssertionError(f"run {run_id} not final after {timeout}s\n{log.read_text()[-6000:]}")


def test_a_block_authenticated_nightly_gets_its_index_built(
    server: PrefectServer, s3_endpoint: str, s3_bucket: str, tmp_path: Path
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_aws import AwsCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    secret = uuid.uuid4().hex + uuid.uuid4().hex
    block = f"moto-{uuid.uuid4().hex[:6]}"
    with temporary_settings({PREFECT_API_URL: server.api}):
        AwsCredentials(
            aws_access_key_id="AKIA" + uuid.uuid4().hex[:16].upper(),
            aws_secret_access_key=secret,
            region_name="us-east-1",
            aws_client_parameters=AwsClientParameters(endpoint_url=s3_endpoint),
        ).save(block)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    write_webdataset(tmp_path / "src", shards=1, per_shard=4, seed=8, size=32)
    s3.upload_file(str(tmp_path / "src" / "00000.tar"), s3_bucket, "raw/00000.tar")

    env = without_aws(server.env)
    env.pop("PYTHONPATH", None)
    deploy = subprocess.run(
        [sys.executable, "-m", "clipbatch_flows.cli.main", "deploy", "--gpu-slots", "2"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "clipbatch-local",
             "--limit", "3"],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            api = httpx.Client(base_url=server.api, timeout=30)
            storage = {"credentials_block": f"aws-credentials/{block}"}
            root = f"s3://{s3_bucket}/blk/emb"
            config = {
                "source": {"url": f"s3://{s3_bucket}/raw/", "storage": storage},
                "sink": {"url": f"{root}/date=2026-11-01/", "storage": storage},
                "model": {"name": "tiny"},
                "runtime": {"device": "cpu", "batch_size": 4},
            }
            adhoc = api.get("/deployments/name/embed-dataset/embed-adhoc").json()["id"]
            created = api.post(
                f"/deployments/{adhoc}/create_flow_run", json={"parameters": {"config": config}}
            )
            assert created.status_code == 201, created.text
            embed_run = created.json()["id"]
            wait_final(api, embed_run, log)

            index = api.get("/deployments/name/build-index/build-index").json()["id"]
            deadline = time.monotonic() + 240
            runs: list[dict] = []
            while time.monotonic() < deadline and not runs:
                every = api.post(
                    "/flow_runs/filter",
                    json={"deployments": {"id": {"any_": [index]}}, "limit": 10},
                ).json()
                runs = [r for r in every if r["parameters"].get("root") == root]
                time.sleep(1)
            assert runs, f"no index build was triggered for {root}\n{log.read_text()[-6000:]}"
            built = wait_final(api, runs[0]["id"], log)
        finally:
            stop(worker)
    assert built["parameters"]["storage"]["credentials_block"] == f"aws-credentials/{block}"
    pointer = s3.get_object(Bucket=s3_bucket, Key="blk/emb/_knn/image/CURRENT.json")
    assert json.loads(pointer["Body"].read())["version"]
    # Lineage says which block the run used; the block's values are nowhere.
    record_key = f"blk/emb/date=2026-11-01/_lineage/{embed_run}.json"
    record = s3.get_object(Bucket=s3_bucket, Key=record_key)["Body"].read().decode()
    stored = json.loads(record)["parameters"]["sink"]["storage"]
    assert stored["credentials_block"] == f"aws-credentials/{block}"
    assert secret not in record and secret not in log.read_text()
    assert REPO.is_dir()  # the worker ran from tmp_path: nothing came from the checkout's cwd
