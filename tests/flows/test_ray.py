"""Issue 9 (optional engine): shard tasks on a real local Ray cluster through prefect-ray.

Runs where the ``ray`` extra is installed (``pip install -e '.[ray]'``); the default dev
environment has no Ray, so this module is skipped there. The cluster is a real
``ray start --head`` with one declared GPU, reached through the Ray client address, the
way ``--task-runner ray://head:10001`` reaches a remote one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("prefect_ray")

from tests import test_dask as shared  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.paths import REPO

# The same dataset and local reference run as the Dask tests.
s3_source = shared.s3_source
local_reference = shared.local_reference

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

REPO = REPO
RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    client_port = free_port()
    argv = [RAY, "start", "--head", "--port", str(free_port()), "--num-cpus", "2"]
    argv += ["--num-gpus", "1", "--ray-client-server-port", str(client_port)]
    argv += ["--include-dashboard", "false", "--disable-usage-stats"]
    argv += ["--temp-dir", str(tmp_path_factory.mktemp("ray"))]
    subprocess.run(argv, cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"ray://127.0.0.1:{client_port}"
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=60)


def test_ray_run_equals_local_run(
    prefect_harness: None,
    ray_address: str,
    s3_source: tuple[str, str],
    s3_endpoint: str,
    local_reference: dict[str, tuple[bytes, bytes]],
) -> None:
    from clipbatch_flows.embed import embed_dataset

    source, bucket = s3_source
    dest = f"s3://{bucket}/emb/ray"
    config = shared.make_config(
        source, dest, s3_endpoint, task_runner=ray_address, gpus_per_shard=1, shard_concurrency=2
    )
    summary = embed_dataset(config)
    assert summary["shards_committed"] == 6 and summary["shards_failed"] == 0
    got, files = shared.embeddings_by_key(dest, s3_endpoint)
    assert files == [f"{i:05d}.parquet" for i in range(6)]
    assert got == local_reference
