"""Issue 9: the flow's shard tasks on a real Dask cluster (scheduler and workers on loopback).

The cluster is real processes (``dask scheduler``, ``dask worker --no-nanny``) so that a
worker can be SIGKILLed like a lost machine. Workers reach moto through the same AWS_*
environment and the Prefect test server through the settings prefect-dask ships with
each task. Where tasks ran is read from a worker plugin that records the shard of every
task a worker starts; model loads from ``process_context().model_loads`` on each worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clipbatch_flows.runners import parse_task_runner
from distributed.diagnostics.plugin import WorkerPlugin

from clipbatch.config import EmbedConfig, StorageOptions, build_config
from clipbatch.errors import ConfigError
from clipbatch.io.storage import get_fs
from clipbatch.synthetic import write_webdataset
from tests.conftest import free_port, upload_dir
from tests.helpers import read_table, tiny_s3_config
from tests.paths import REPO

pytestmark = pytest.mark.timeout(240)

REPO = REPO
DASK = str(Path(sys.executable).with_name("dask"))
PLUGIN = "clipbatch-test-shards"


class ShardRecorder(WorkerPlugin):
    """Worker plugin: the shard name of every task this worker starts executing."""

    name = PLUGIN

    def setup(self, worker: Any) -> None:
        self.worker = worker
        self.started: list[str] = []
        self.running: str | None = None  # the shard executing right now

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if start == "executing":
            self.running = None
        if finish != "executing":
            return
        ts = self.worker.state.tasks.get(key)
        params = getattr(getattr(ts, "run_spec", None), "kwargs", {}).get("parameters")
        shards = params.get("shards") if isinstance(params, dict) else None
        for shard in shards or []:  # a task run carries a group of shards (one by default)
            self.started.append(shard.name)
            self.running = shard.name


class Cluster:
    """A Dask scheduler on 127.0.0.1 and the worker processes started against it."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.logs = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.scheduler = self._spawn(
            "scheduler",
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", str(self.port)]
            + ["--no-dashboard", "--no-show"],
        )
        from distributed import Client

        self.client = Client(self.address, timeout="60s", set_as_default=False)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        log = open(self.logs / f"{name}.log", "wb")  # noqa: SIM115 - kept open for the process
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def start_worker(self, name: str, gpu: bool) -> None:
        """A one-thread worker, without a nanny, so SIGKILL on it loses the worker outright."""
        argv = [DASK, "worker", f"tcp://{self.address}", "--name", name, "--nthreads", "1"]
        argv += ["--no-nanny", "--no-dashboard", "--host", "127.0.0.1", "--death-timeout", "60"]
        if gpu:
            argv += ["--resources", "GPU=1"]
        n = len(self.client.scheduler_info(n_workers=-1)["workers"])
        self._spawn(name, argv)
        self.client.wait_for_workers(n + 1, timeout=90)
        self.client.register_plugin(ShardRecorder(), name=PLUGIN)

    def worker_addresses(self) -> dict[str, str]:
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return {w["name"]: addr for addr, w in info.items()}

    def on_workers(self, fn: Any) -> dict[str, Any]:
        """``fn(dask_worker)`` on every live worker, by worker name."""
        by_addr = {a: n for n, a in self.worker_addresses().items()}
        return {by_addr[a]: v for a, v in self.client.run(fn).items()}

    def shards_started(self) -> dict[str, list[str]]:
        return self.on_workers(lambda dask_worker: list(dask_worker.plugins[PLUGIN].started))

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def close(self) -> None:
        self.client.close()
        # Throwaway processes: a graceful Dask shutdown only costs test time.
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(15)


def load_counts(cluster: Cluster) -> dict[str, int]:
    def count(dask_worker: Any) -> int:
        import clipbatch.process

        return clipbatch.process.process_context().model_loads

    return cluster.on_workers(count)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("dask"))
    try:
        c.start_worker("gpu", gpu=True)
        c.start_worker("plain", gpu=False)
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def s3_source(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> tuple[str, str]:
    """Six small WebDataset shards on moto; returns (source URL, bucket)."""
    import boto3

    bucket = f"dask-test-{uuid.uuid4().hex[:8]}"  # per module: test_ray.py reuses this
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket
    )
    local = tmp_path_factory.mktemp("wds")
    write_webdataset(local, shards=6, per_shard=12, seed=11, size=72)
    return upload_dir(local, bucket, "laion", s3_endpoint), bucket


def make_config(source: str, dest: str, endpoint: str, **runtime: Any) -> EmbedConfig:
    runtime = {"batch_size": 4, "retry_delay_seconds": 0.2, "task_retries": 3, **runtime}
    return tiny_s3_config(source, dest, endpoint, sink={"dtype": "float32"}, **runtime)


def embeddings_by_key(dest: str, endpoint: str) -> tuple[dict[str, tuple[bytes, bytes]], list]:
    table, files = read_table(dest, endpoint)
    out = {}
    for row in table.select(["key", "image_embedding", "text_embedding", "status"]).to_pylist():
        assert row["status"] == "ok"
        out[row["key"]] = (
            np.asarray(row["image_embedding"], np.float32).tobytes(),
            np.asarray(row["text_embedding"], np.float32).tobytes(),
        )
    assert table.num_rows == len(out)  # every key exactly once
    return out, files


@pytest.fixture(scope="module")
def local_reference(
    prefect_harness: None, s3_source: tuple[str, str], s3_endpoint: str
) -> dict[str, tuple[bytes, bytes]]:
    """The same dataset embedded by the default in-process thread runner."""
    from clipbatch_flows.embed import embed_dataset

    source, bucket = s3_source
    dest = f"s3://{bucket}/emb/local"
    summary = embed_dataset(make_config(source, dest, s3_endpoint, shard_concurrency=2))
    assert summary["shards_committed"] == 6
    reference, files = embeddings_by_key(dest, s3_endpoint)
    assert len(reference) == 72 and len(files) == 6
    return reference


def test_parse_task_runner() -> None:
    assert parse_task_runner(None).kind == "threads"
    assert parse_task_runner("threads").kind == "threads"
    spec = parse_task_runner("dask://10.0.0.5:8786")
    assert (spec.kind, spec.address) == ("dask", "tcp://10.0.0.5:8786")
    assert parse_task_runner("ray://head:10001").address == "ray://head:10001"
    with pytest.raises(ConfigError, match="not understood"):
        parse_task_runner("spark://x:1")
    with pytest.raises(ConfigError, match="invalid configuration"):
        build_config({"source": "s3://b/x", "dest": "s3://b/y", "runtime": {"task_runner": "x"}})


def test_gpu_claims_need_a_cluster() -> None:
    from clipbatch_flows.runners import shard_submitter
    from clipbatch_tasks.encode import encode_shards

    from clipbatch.config import RuntimeConfig

    with (
        pytest.raises(ConfigError, match="Dask or Ray"),
        shard_submitter(encode_shards, RuntimeConfig(gpus_per_shard=1)),
    ):
        pass


def test_cli_flags_select_the_runner() -> None:
    import argparse

    from clipbatch_flows.cli.run import add_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(
        ["--source", "s3://b/x", "--dest", "s3://b/y", "--task-runner", "dask://sched:8786"]
        + ["--gpus-per-shard", "1"]
    )
    runtime = config_from_args(args).runtime
    assert runtime.task_runner == "dask://sched:8786" and runtime.gpus_per_shard == 1.0


@pytest.mark.slow
def test_dask_run_equals_local_run_on_gpu_workers_only(
    prefect_harness: None,
    cluster: Cluster,
    s3_source: tuple[str, str],
    s3_endpoint: str,
    local_reference: dict[str, tuple[bytes, bytes]],
) -> None:
    from clipbatch_flows.embed import embed_dataset

    source, bucket = s3_source
    dest = f"s3://{bucket}/emb/dask"
    config = make_config(
        source,
        dest,
        s3_endpoint,
        task_runner=f"dask://{cluster.address}",
        gpus_per_shard=1,
        shard_concurrency=4,  # more in flight than GPU slots: the resource must hold them back
    )
    summary = embed_dataset(config)
    assert summary["shards_committed"] == 6 and summary["shards_failed"] == 0

    got, files = embeddings_by_key(dest, s3_endpoint)
    assert files == [f"{i:05d}.parquet" for i in range(6)]
    assert got == local_reference  # byte for byte, both towers, every key

    started = cluster.shards_started()
    assert sorted(started["gpu"]) == [f"{i:05d}" for i in range(6)]
    assert started["plain"] == []
    # One load on the worker that encoded six shards; none where nothing ran.
    assert load_counts(cluster) == {"gpu": 1, "plain": 0}

    # A rerun skips every shard (same fingerprints) and submits nothing to the cluster.
    again = embed_dataset(config)
    assert again["shards_skipped"] == 6 and again["shards_committed"] == 0
    assert sorted(cluster.shards_started()["gpu"]) == [f"{i:05d}" for i in range(6)]


def _running_shard(dask_worker: Any) -> tuple[str | None, int]:
    import clipbatch.process

    return (
        dask_worker.plugins[PLUGIN].running,
        clipbatch.process.process_context().model_loads,
    )


def _kill_when_running(cluster: Cluster, victim: str, killed: dict[str, Any]) -> None:
    """SIGKILL ``victim`` inside a shard: the task body runs (its model is loaded)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            running, loads = cluster.on_workers(_running_shard)[victim]
        except Exception:  # noqa: BLE001 - the worker may be busy importing; poll again
            time.sleep(0.05)
            continue
        if running is not None and loads >= 1:
            killed["shard"] = running
            cluster.kill(victim)
            return
        time.sleep(0.01)


@pytest.mark.slow
def test_sigkill_of_a_gpu_worker_mid_run_gives_exact_output(
    prefect_harness: None,
    tmp_path: Path,
    s3_source: tuple[str, str],
    s3_endpoint: str,
    local_reference: dict[str, tuple[bytes, bytes]],
) -> None:
    """One of two GPU workers dies (SIGKILL) while it encodes a shard.

    Proves: the scheduler hands the lost, resource-annotated task to the other worker
    that advertises GPU (Dask's retry; a lone GPU worker would leave it waiting for a
    replacement, by design), the re-run of the same Prefect task run commits the shard,
    and the table equals the local run's byte for byte with every key exactly once.
    """
    from clipbatch_flows.embed import embed_dataset

    source, bucket = s3_source
    dest = f"s3://{bucket}/emb/killed"
    cluster = Cluster(tmp_path)
    try:
        cluster.start_worker("gpu-a", gpu=True)
        cluster.start_worker("gpu-b", gpu=True)
        config = make_config(
            source,
            dest,
            s3_endpoint,
            task_runner=f"dask://{cluster.address}",
            gpus_per_shard=1,
            shard_concurrency=2,
        )
        killed: dict[str, Any] = {}
        killer = threading.Thread(target=_kill_when_running, args=(cluster, "gpu-a", killed))
        killer.start()
        summary = embed_dataset(config)
        killer.join(5)
        assert killed, "the worker was never seen running a shard"
        assert summary["shards_committed"] == 6 and summary["shards_failed"] == 0

        got, files = embeddings_by_key(dest, s3_endpoint)
        assert files == [f"{i:05d}.parquet" for i in range(6)]
        assert got == local_reference
        # The shard that died with gpu-a was started again on the surviving GPU worker.
        assert killed["shard"] in cluster.shards_started()["gpu-b"]

        # The dead worker may have left a staged object; the next run skips every shard and
        # removes it, so the table stays exactly the local one.
        again = embed_dataset(config)
        assert again["shards_skipped"] == 6 and again["shards_committed"] == 0
        fs, path = get_fs(dest, StorageOptions(endpoint_url=s3_endpoint))
        assert fs.find(f"{path}/_tmp") == []
        assert embeddings_by_key(dest, s3_endpoint)[0] == local_reference
    finally:
        cluster.close()
