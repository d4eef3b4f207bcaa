"""embed -> build-index -> curate, by the deployments' triggers, on a real Prefect server.

``prefect_test_harness`` runs no trigger services, so this runs a real server and a
process worker: an embed run's completion starts the index build (and the score run),
and the index build's ``clipbatch.index.completed`` starts the curate run, which ships
its shards.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from clipbatch.synthetic import write_webdataset
from tests.flows.test_blocks_trigger import wait_final
from tests.prefect_server import PrefectServer, prefect_server, stop

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PrefectServer]:
    with prefect_server(tmp_path / "prefect-home") as s:
        yield s


def runs_of(api: httpx.Client, deployment: str, root: str) -> list[dict]:
    dep = api.get(f"/deployments/name/{deployment}").json()["id"]
    every = api.post(
        "/flow_runs/filter", json={"deployments": {"id": {"any_": [dep]}}, "limit": 20}
    ).json()
    return [r for r in every if r["parameters"].get("root") == root]


def wait_for_runs(api: httpx.Client, deployment: str, root: str, log: Path) -> list[dict]:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        runs = runs_of(api, deployment, root)
        if runs:
            return runs
        time.sleep(1)  # the poll's interval
    raise AssertionError(f"no {deployment} run was triggered for {root}\n{log.read_text()[-6000:]}")


def test_an_index_build_triggers_curation_of_its_root(
    server: PrefectServer, tmp_path: Path
) -> None:
    write_webdataset(tmp_path / "src", shards=2, per_shard=6, seed=5, size=32)
    env = dict(server.env)
    env.pop("PYTHONPATH", None)
    deploy = subprocess.run(
        [sys.executable, "-m", "clipbatch_flows.cli.main", "deploy", "--gpu-slots", "1"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    api = httpx.Client(base_url=server.api, timeout=30)
    root = str(tmp_path / "emb")
    out = tmp_path / "curated"
    curate = api.get("/deployments/name/curate/curate").json()
    spec = {**curate["parameters"]["spec"], "output": {"url": str(out), "rows_per_shard": 5}}
    spec["rules"] = {**spec["rules"], "min_similarity": None}  # the tiny model's cosines are low
    patched = api.patch(f"/deployments/{curate['id']}", json={"parameters": {"spec": spec}})
    assert patched.status_code == 204, patched.text
    log = tmp_path / "worker.log"
    with log.open("w") as sink:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "clipbatch-local",
             "--limit", "5"],
            env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            adhoc = api.get("/deployments/name/embed-dataset/embed-adhoc").json()["id"]
            config = {
                "source": {"url": str(tmp_path / "src")},
                "sink": {"url": f"{root}/date=2026-11-01/"},
                "model": {"name": "tiny"},
                "runtime": {"device": "cpu", "batch_size": 4},
            }
            created = api.post(
                f"/deployments/{adhoc}/create_flow_run", json={"parameters": {"config": config}}
            )
            assert created.status_code == 201, created.text
            wait_final(api, created.json()["id"], log)
            (index,) = wait_for_runs(api, "build-index/build-index", root, log)
            index = wait_final(api, index["id"], log)
            curated = wait_for_runs(api, "curate/curate", root, log)
            assert len(curated) == 1  # one index build, one curation
            curated = wait_final(api, curated[0]["id"], log)
        finally:
            stop(worker)
    # The curation ran after the index build completed, for the same root and store.
    assert datetime.fromisoformat(curated["start_time"]) >= datetime.fromisoformat(
        index["end_time"]
    )
    assert curated["parameters"]["root"] == root
    assert curated["parameters"]["storage"] == index["parameters"]["storage"]
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert (tmp_path / "emb" / "_curate" / "nightly" / "state.json").is_file()
