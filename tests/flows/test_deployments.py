"""Issue 7: the deployments, run the way platform teams run them.

Real processes on loopback: `prefect server start` (on a fresh database of the session's
PostgreSQL cluster, as in production; SQLite, with a warning, where there is none:
tests/prefect_server.py), the process work pool, `prefect deploy --all --prefect-file
deployments/prefect.yaml` and a process worker, all subprocesses with PREFECT_API_URL
set. Object storage is the session's moto server, reached by the flow-run processes
through AWS_ENDPOINT_URL_S3 exactly as a worker in docker/compose.yaml reaches MinIO.

Every flow run is a fresh Python on the worker (~10 s of imports on 2 cores), so the
module makes 9 of them in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import boto3
import httpx
import psutil
import pytest

from clipbatch.synthetic import write_webdataset
from tests.conftest import upload_dir
from tests.helpers import read_table
from tests.paths import REPO
from tests.postgres import PostgresUnavailable, find_bindir, postgres_cluster, start_cluster
from tests.prefect_server import (
    PREFECT,
    PrefectServer,
    SQLiteFallbackWarning,
    current_postgres,
    database_url,
    prefect_server,
    stop,
    stop_session_postgres,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

ROOT = REPO
POOL = "clipbatch-local"
NIGHTLY_BUCKET = "clipbatch"  # named in deployments/prefect.yaml
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# A tiny CPU model in every run: the deployments' own defaults name ViT-B/32.
TINY = {"model": "tiny", "device": "cpu"}


class RetryBusy(httpx.HTTPTransport):
    """Retry what the server answers 503 (a busy SQLite database, under a worker, the
    trigger's index builds and the test at once), as Prefect's own client does; the
    UI's requests, made here by hand, would otherwise fail the test by chance. Counts
    them: on PostgreSQL there must be none (test_no_busy_database_on_postgresql)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.busy = 0  # 503s answered to this client

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        for attempt in range(8):
            response = super().handle_request(request)
            if response.status_code == 503:
                self.busy += 1
            if response.status_code != 503 or attempt == 7:
                return response
            response.read()
            response.close()
            time.sleep(min(0.25 * 2**attempt, 4))
        raise AssertionError("unreachable")


class Stack:
    """A running server + worker, and a REST client for it."""

    def __init__(self, server: PrefectServer, logs: Path, s3: str) -> None:
        self.server = server
        self.api = server.api
        self.env = server.env
        self.logs = logs
        self.s3 = s3
        self.transport = RetryBusy()
        self.http = httpx.Client(base_url=self.api, timeout=30, transport=self.transport)

    def cli(self, *args: str, timeout: float = 120) -> str:
        proc = subprocess.run(
            [*PREFECT, *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, (
            f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        )
        return proc.stdout

    def deployment(self, name: str) -> dict[str, Any]:
        r = self.http.get(f"/deployments/name/{name}")
        r.raise_for_status()
        return r.json()

    def flow_run(self, run_id: str) -> dict[str, Any]:
        r = self.http.get(f"/flow_runs/{run_id}")
        r.raise_for_status()
        return r.json()

    def flow_runs(self, **flt: Any) -> list[dict[str, Any]]:
        r = self.http.post("/flow_runs/filter", json={**flt, "limit": 200})
        r.raise_for_status()
        return r.json()

    def wait(self, run_id: str, timeout: float = 180) -> dict[str, Any]:
        """Poll until the run is final; assert it Completed, with the worker log if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state_type"] in FINAL:
                assert run["state_type"] == "COMPLETED", (
                    f"run {run['name']} ended {run['state_name']}: {run['state']['message']}\n"
                    f"{self.worker_log()}"
                )
                return run
            time.sleep(1)
        raise AssertionError(f"run {run_id} not final after {timeout}s\n{self.worker_log()}")

    def create_run(self, deployment: str, body: dict[str, Any]) -> httpx.Response:
        dep = self.deployment(deployment)
        return self.http.post(f"/deployments/{dep['id']}/create_flow_run", json=body)

    def worker_log(self) -> str:
        return (self.logs / "worker.log").read_text()[-6000:]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("prefect-home")
    # What the flow-run processes read: the object store. Credentials come from conftest's
    # environment (moto's). CLIPBATCH_HOME is left unset on purpose: the pull step finds
    # the code beside the installed package, as for a local worker.
    with (
        prefect_server(home, AWS_ENDPOINT_URL_S3=s3_endpoint, PYTHONPATH=str(ROOT)) as server,
        (home / "worker.log").open("w") as wlog,
    ):
        env = server.env
        s = Stack(server, home, s3_endpoint)
        # The documented set-up script: the pool, and the `default` queue's GPU slots
        # (3 here, so the backfill's children run side by side).
        setup = subprocess.run(
            ["bash", "deployments/setup-work-pools.sh"],
            env={**env, "GPU_SLOTS": "3", "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert setup.returncode == 0, setup.stdout + setup.stderr
        # The worker starts (~10 s of imports) while `prefect deploy` runs.
        worker = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", POOL, "--limit", "4"],
            env=env,
            cwd=ROOT,
            stdout=wlog,
            stderr=subprocess.STDOUT,
        )
        try:
            s.cli("deploy", "--all", "--prefect-file", "deployments/prefect.yaml")
            yield s
        finally:
            stop(worker)


@pytest.fixture(scope="module")
def nightly_bucket(s3_endpoint: str) -> str:
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=NIGHTLY_BUCKET)
    return NIGHTLY_BUCKET


def _dataset(tmp: Path, bucket: str, prefix: str, endpoint: str, shards: int, seed: int) -> str:
    write_webdataset(tmp, shards=shards, per_shard=4, seed=seed, size=48)
    return upload_dir(tmp, bucket, prefix, endpoint)


def _objects(endpoint: str, bucket: str, prefix: str) -> dict[str, tuple[str, str]]:
    """Table files under prefix: name -> (ETag, LastModified); a rewrite changes both."""
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(prefix) :].lstrip("/")
            if name.endswith(".parquet") and not name.startswith("_"):
                out[name] = (obj["ETag"], obj["LastModified"].isoformat())
    return out


def _run_id(cli_output: str) -> str:
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", cli_output)
    assert match, cli_output
    return match.group(1)


def _gone(procs: list[psutil.Process], timeout: float = 30) -> list[psutil.Process]:
    """The processes of ``procs`` still alive after ``timeout`` (a zombie is not)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def _cluster_processes(pid: int) -> list[psutil.Process]:
    postmaster = psutil.Process(pid)
    return [postmaster, *postmaster.children(recursive=True)]


@pytest.fixture(scope="session", autouse=True)
def _session_postgres_gone_at_the_end() -> Iterator[None]:
    """At the end of the session (after every module's servers, whatever failed): the
    session's PostgreSQL cluster is stopped, and none of its processes is left."""
    yield
    cluster = current_postgres()
    pid = cluster.postmaster_pid() if cluster is not None else None
    procs = _cluster_processes(pid) if pid is not None else []
    stop_session_postgres()  # else at exit (tests/prefect_server.py)
    assert _gone(procs) == [], procs
    assert cluster is None or not cluster.data.exists()


def test_postgres_cluster_is_stopped_and_removed_even_on_failure(tmp_path: Path) -> None:
    """The helper behind every server here: initdb + pg_ctl as `postgres`, a database
    asyncpg (Prefect's driver) reaches, and nothing left after an error in the block, nor
    after the process that started it dies without stopping it (its watchdog)."""
    if find_bindir() is None:
        # No PostgreSQL on this machine: the servers fall back to SQLite, and say so.
        with pytest.raises(PostgresUnavailable):
            start_cluster()
        with pytest.warns(SQLiteFallbackWarning, match="SQLite"):
            url, database, _ = database_url(tmp_path)
        assert database == "sqlite" and url.startswith("sqlite+aiosqlite://")
        return
    import asyncpg

    procs: list[psutil.Process] = []
    with pytest.raises(RuntimeError, match="in the block"), postgres_cluster() as cluster:
        pid = cluster.postmaster_pid()
        assert pid is not None
        procs = _cluster_processes(pid)
        assert len(procs) > 1
        if os.geteuid() == 0:
            assert {p.username() for p in procs} == {"postgres"}
        postmaster = psutil.Process(pid)
        listening = getattr(postmaster, "net_connections", postmaster.connections)("tcp")
        assert {c.laddr.ip for c in listening} == {"127.0.0.1"}
        name = cluster.createdb()

        async def query() -> str:
            conn = await asyncpg.connect(cluster.url(name, driver="postgresql"))
            try:
                return await conn.fetchval("select current_database()")
            finally:
                await conn.close()

        assert asyncio.run(query()) == name
        raise RuntimeError("an error in the block")
    assert _gone(procs) == []
    assert not cluster.data.exists()

    # Killed without a word (os._exit, as a hard timeout does): the watchdog stops it.
    starter = (
        "import os, sys; sys.path.insert(0, sys.argv[1]);"
        "from tests.postgres import start_cluster; c = start_cluster();"
        "print(c.postmaster_pid(), c.data, flush=True); os._exit(3)"
    )
    out = subprocess.run(
        [sys.executable, "-c", starter, str(ROOT)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 3, out.stderr
    pid_text, data = out.stdout.split()
    with contextlib.suppress(psutil.NoSuchProcess):
        assert _gone([psutil.Process(int(pid_text))]) == []
    deadline = time.monotonic() + 30
    while Path(data).exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not Path(data).exists()


def test_deployment_run_with_params(stack: Stack, tmp_path: Path, s3_bucket: str) -> None:
    source = _dataset(tmp_path / "raw", s3_bucket, "adhoc/raw", stack.s3, shards=2, seed=1)
    dest = f"s3://{s3_bucket}/adhoc/emb"
    out = stack.cli(
        "deployment",
        "run",
        "embed-dataset/embed-adhoc",
        "--param",
        f"source={source}",
        "--param",
        f"dest={dest}",
        "--params",
        json.dumps(TINY),
    )
    run = stack.wait(_run_id(out))
    assert run["parameters"] == {"source": source, "dest": dest, **TINY}
    table, files = read_table(dest, stack.s3)
    assert files == ["00000.parquet", "00001.parquet"]
    assert table.num_rows == 8 and set(table.column("status").to_pylist()) == {"ok"}


def test_nightly_schedule(stack: Stack, tmp_path: Path, nightly_bucket: str) -> None:
    # The server's scheduler makes the upcoming runs: 00:30 in Berlin, whatever UTC says.
    dep = stack.deployment("embed-dataset/embed-nightly")
    assert dep["concurrency_limit"] == 1 or dep["global_concurrency_limit"]["limit"] == 1
    deadline = time.monotonic() + 60
    upcoming: list[dict[str, Any]] = []
    while not upcoming and time.monotonic() < deadline:
        upcoming = stack.flow_runs(deployments={"id": {"any_": [dep["id"]]}})
        time.sleep(1)
    assert upcoming, "the scheduler made no runs for embed-nightly"
    berlin = ZoneInfo("Europe/Berlin")
    for run in upcoming:
        local = dt.datetime.fromisoformat(run["expected_start_time"]).astimezone(berlin)
        assert (local.hour, local.minute) == (0, 30), local

    # A past night: 23:30 UTC on day D is already D+1 in Berlin (00:30 in winter, 01:30
    # in summer), so the nightly (offset -1) embeds D. Read in UTC it would pick D-1.
    day = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=20)).date()
    part, decoy = day.isoformat(), (day - dt.timedelta(days=1)).isoformat()
    ep = stack.s3
    _dataset(tmp_path / "d1", nightly_bucket, f"raw/{decoy}", ep, shards=1, seed=2)
    _dataset(tmp_path / "d2", nightly_bucket, f"raw/{part}", ep, shards=2, seed=3)
    night = f"{part}T23:30:00+00:00"
    body = {"state": {"type": "SCHEDULED", "state_details": {"scheduled_time": night}}}
    r = stack.create_run("embed-dataset/embed-nightly", {**body, "parameters": TINY})
    assert r.status_code == 201, r.text
    stack.wait(r.json()["id"])
    dest = f"embeddings/vit-b-32/date={part}"
    first = _objects(ep, nightly_bucket, dest)
    assert sorted(first) == ["00000.parquet", "00001.parquet"]
    assert _objects(ep, nightly_bucket, f"embeddings/vit-b-32/date={decoy}") == {}

    # A late shard lands in the same partition; the next run of that night embeds only it.
    late = tmp_path / "late"
    for old in write_webdataset(late, shards=3, per_shard=4, seed=4, size=48)[:2]:
        old.unlink()  # only 00002.tar is new
    upload_dir(late, nightly_bucket, f"raw/{part}", ep)
    r = stack.create_run("embed-dataset/embed-nightly", {**body, "parameters": TINY})
    assert r.status_code == 201, r.text
    stack.wait(r.json()["id"])
    second = _objects(ep, nightly_bucket, dest)
    assert sorted(second) == ["00000.parquet", "00001.parquet", "00002.parquet"]
    assert {k: second[k] for k in first} == first  # untouched: skipped by fingerprint
    table, _ = read_table(f"s3://{nightly_bucket}/{dest}", ep)
    assert table.num_rows == 12


def _index_runs(stack: Stack, root: str, count: int, timeout: float = 180) -> list[dict]:
    """The build-index runs the trigger started for ``root``, once ``count`` are final."""
    dep = stack.deployment("build-index/build-index")["id"]
    deadline = time.monotonic() + timeout
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        every = stack.flow_runs(deployments={"id": {"any_": [dep]}})
        runs = [r for r in every if r["parameters"].get("root") == root]
        if len(runs) >= count and all(r["state_type"] in FINAL for r in runs):
            return sorted(runs, key=lambda r: r["start_time"])
        time.sleep(1)
    raise AssertionError(f"{len(runs)} index run(s) for {root}: {runs}\n{stack.worker_log()}")


def _knn_build(endpoint: str, bucket: str, root_key: str) -> dict[str, Any]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pointer = client.get_object(Bucket=bucket, Key=f"{root_key}/_knn/image/CURRENT.json")
    version = json.loads(pointer["Body"].read())["version"]
    body = client.get_object(Bucket=bucket, Key=f"{root_key}/_knn/image/{version}/build.json")
    return json.loads(body["Body"].read())


def test_embed_runs_trigger_the_index_build(stack: Stack, tmp_path: Path, s3_bucket: str) -> None:
    """The deployment's trigger on our completion event, on a real server: each nightly
    partition's run starts a build-index run for the partition root, which adds it."""
    root = f"s3://{s3_bucket}/knn/emb"
    days = ["2026-11-01", "2026-11-02"]
    for i, day in enumerate(days):
        source = _dataset(tmp_path / day, s3_bucket, f"knn/raw/{day}", stack.s3, 1, 30 + i)
        args = ["--param", f"source={source}", "--param", f"dest={root}/date={day}/"]
        out = stack.cli("deployment", "run", "embed-dataset/embed-adhoc", *args,
                        "--params", json.dumps(TINY))  # fmt: skip
        stack.wait(_run_id(out))
        runs = _index_runs(stack, root, count=i + 1)
        assert {r["state_type"] for r in runs} == {"COMPLETED"}, (runs, stack.worker_log())
        latest = runs[-1]
        assert latest["work_queue_name"] == "control"
        build = _knn_build(stack.s3, s3_bucket, "knn/emb")
        assert build["vectors"] == 4 * (i + 1)
        assert sorted(f["key"] for f in build["files"]) == [
            f"date={d}/00000.parquet" for d in days[: i + 1]
        ]
        assert build["run"]["flow_run_id"] == latest["id"]  # lineage: the run that built it
    # The second night was added to the first night's index, not rebuilt.
    assert build["parent"] is not None
    # One build per root at a time: the root's limit, made by the first run.
    limits = stack.http.post("/v2/concurrency_limits/filter", json={}).json()
    mine = [c for c in limits if c["name"].startswith("clipbatch-index-emb-")]
    assert mine and {c["limit"] for c in mine} == {1}


def test_backfill_three_partitions_twice(stack: Stack, tmp_path: Path, s3_bucket: str) -> None:
    ep = stack.s3
    days = ["2026-10-01", "2026-10-02", "2026-10-03"]
    for i, day in enumerate(days):
        _dataset(tmp_path / day, s3_bucket, f"bf/raw/{day}", ep, shards=1, seed=10 + i)
    spec = {
        "source_template": f"s3://{s3_bucket}/bf/raw/{{date}}/",
        "dest_template": f"s3://{s3_bucket}/bf/emb/{{date}}/",
        "start_date": days[0],
        "end_date": days[-1],
        "model": {"name": "tiny"},
        "runtime": {"device": "cpu", "batch_size": 8, "task_retries": 0},
        "max_concurrent_runs": 3,
        "poll_seconds": 1,
    }
    # The backfill waits from the `control` queue; its children take `default` slots.
    assert stack.deployment("embed-backfill/embed-backfill")["work_queue_name"] == "control"
    args = ("deployment", "run", "embed-backfill/embed-backfill", "--params")
    parent = stack.wait(_run_id(stack.cli(*args, json.dumps({"spec": spec}))), timeout=200)
    adhoc = stack.deployment("embed-dataset/embed-adhoc")["id"]
    by_backfill = {
        "flow_runs": {"tags": {"all_": ["backfill"]}},
        "deployments": {"id": {"any_": [adhoc]}},
    }
    children = stack.flow_runs(**by_backfill)
    assert sorted(c["name"] for c in children) == [f"backfill-{d}" for d in days]
    assert {c["state_type"] for c in children} == {"COMPLETED"}
    assert {c["parameters"]["partition"] for c in children} == set(days)
    outputs = {}
    for day in days:
        outputs[day] = _objects(ep, s3_bucket, f"bf/emb/{day}")
        assert sorted(outputs[day]) == ["00000.parquet"], day
        table, _ = read_table(f"s3://{s3_bucket}/bf/emb/{day}", ep)
        assert table.num_rows == 4
        assert table.column("source_uri")[0].as_py().endswith(f"bf/raw/{day}/00000.tar")
    artifact = _artifact(stack, parent["id"])
    assert [(r["partition"], r["state"], r["reused"]) for r in artifact] == [
        (d, "Completed", False) for d in days
    ]

    # Second trigger of the same backfill: no new child runs, no rewritten output.
    again = stack.wait(_run_id(stack.cli(*args, json.dumps({"spec": spec}))), timeout=120)
    assert len(stack.flow_runs(**by_backfill)) == 3
    for day in days:
        assert _objects(ep, s3_bucket, f"bf/emb/{day}") == outputs[day]
    rows = _artifact(stack, again["id"])
    assert [(r["partition"], r["state"], r["reused"]) for r in rows] == [
        (d, "Completed", True) for d in days
    ]
    assert {r["flow_run_id"] for r in rows} == {c["id"] for c in children}


def _artifact(stack: Stack, flow_run_id: str) -> list[dict[str, Any]]:
    r = stack.http.post(
        "/artifacts/filter",
        json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "type": {"any_": ["table"]}}},
    )
    r.raise_for_status()
    (artifact,) = r.json()
    data = artifact["data"]
    return json.loads(data) if isinstance(data, str) else data


def test_ui_custom_run(stack: Stack, tmp_path: Path, s3_bucket: str) -> None:
    source = _dataset(tmp_path / "raw", s3_bucket, "ui/raw", stack.s3, shards=1, seed=20)
    dest = f"s3://{s3_bucket}/ui/emb"
    # The body the UI's "Custom run" posts (prefect-ui-library's
    # mapDeploymentFlowRunCreateV2ToDeploymentFlowRunRequest): the form's JSON values and
    # the run options. It sends no enforce_parameter_schema: the deployment's own
    # `enforce_parameter_schema: true` (prefect.yaml) makes the server check the form.
    form = {
        "config": {
            "source": {"url": source, "kind": "webdataset"},
            "sink": {"url": dest, "dtype": "float32"},
            "model": {"name": "tiny"},
            "runtime": {"device": "cpu", "batch_size": 4},
        }
    }
    body = {
        "name": "ui-custom-run",
        "parameters": form,
        "idempotency_key": None,
        "context": {},
        "tags": ["ui"],
        "parent_task_run_id": None,
        "infrastructure_document_id": None,
        "state": {"type": "SCHEDULED", "message": "Run from the Prefect UI", "state_details": {}},
        "empirical_policy": {"retries": 0, "retry_delay": 0},
        "work_queue_name": None,
        "job_variables": {},
    }
    r = stack.create_run("embed-dataset/embed-adhoc", body)
    assert r.status_code == 201, r.text
    stack.wait(r.json()["id"])
    table, files = read_table(dest, stack.s3)
    assert files == ["00000.parquet"] and table.num_rows == 4
    assert table.schema.field("image_embedding").type.value_type == "float"

    # Out of bounds: refused before any run exists, with the field and the bound named.
    bad = json.loads(json.dumps(body))
    bad["parameters"]["config"]["runtime"]["batch_size"] = 0
    bad["name"] = "ui-bad-run"
    r = stack.create_run("embed-dataset/embed-adhoc", bad)
    assert r.status_code == 409, r.text
    message = r.json()["detail"]
    assert "batch_size" in message and "minimum of 1" in message, message
    assert stack.flow_runs(flow_runs={"name": {"any_": ["ui-bad-run"]}}) == []

    # The backfill form refuses a bad bound the same way.
    r = stack.create_run(
        "embed-backfill/embed-backfill",
        {
            **body,
            "parameters": {
                "spec": {
                    "source_template": "s3://b/{date}/",
                    "dest_template": "s3://b/e/{date}/",
                    "max_concurrent_runs": 0,
                }
            },
        },
    )
    assert r.status_code == 409, r.text
    assert "max_concurrent_runs" in r.json()["detail"], r.text


def test_no_busy_database_on_postgresql(stack: Stack) -> None:
    """Last in the module, after every run above: the 503s ("database is locked") that
    RetryBusy exists for are SQLite's; PostgreSQL answered none, to anyone (the server
    logs each one: PREFECT_SERVER_LOG_RETRYABLE_ERRORS)."""
    logged = stack.server.busy_answers()
    assert logged >= stack.transport.busy  # every 503 this client saw is in the log
    if stack.server.on_postgresql:
        assert (stack.transport.busy, logged) == (0, 0), stack.server.log.read_text()[-6000:]
        assert stack.server.error_answers() == 0, stack.server.log.read_text()[-6000:]
    else:
        print(f"SQLite: {logged} request(s) answered 503, {stack.transport.busy} to the test")
