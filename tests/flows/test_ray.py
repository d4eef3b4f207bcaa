"""Issue 9 (optional engine): shard tasks on a real local Ray cluster through prefect-ray.

Runs where the ``ray`` extra is installed (``pip install 'clipbatch[ray]'``); without it
the module is skipped, saying so. The cluster is a real ``ray start --head`` with one
declared GPU, reached through the Ray client address, the way ``--task-runner
ray://head:10001`` reaches a remote one.

Where the shard tasks ran is read from what they wrote: each task stages its shard under
``{dest}/_tmp/{run}__{host}__{pid}__{token}/`` (sink/layout.py), and a counting proxy of
ours in front of moto sees those PUTs. While the run goes, each pid seen is looked up:
a Ray worker process (``ray::…``, a child of the raylet), never this test's process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

pytest.importorskip(
    "prefect_ray",
    reason="Ray is optional: pip install 'clipbatch[ray]' (prefect-ray and ray) to run this",
)

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from clipbatch.sink.layout import SEP, TMP_DIR  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.faultproxy import FaultProxy  # noqa: E402
from tests.flows import test_dask as shared  # noqa: E402
from tests.paths import REPO  # noqa: E402

# The same dataset and local reference run as the Dask tests.
s3_source = shared.s3_source
local_reference = shared.local_reference

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

RAY = str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def ray_address() -> Iterator[str]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    client_port = free_port()
    argv = [RAY, "start", "--head", "--port", str(free_port()), "--num-cpus", "2"]
    argv += ["--num-gpus", "1", "--ray-client-server-port", str(client_port)]
    argv += ["--include-dashboard", "false", "--disable-usage-stats"]
    # Loopback only: without it Ray binds its processes to the machine's own address and
    # they connect to one another there (tests reach 127.0.0.1 and ::1, nothing else).
    argv += ["--node-ip-address", "127.0.0.1"]
    # A short temp dir: Ray's Unix sockets live under it, and a socket path over 107 bytes
    # (pytest's tmp_path is deep) makes the Ray client's per-client server die at start.
    temp = tempfile.mkdtemp(prefix="cbray-")
    argv += ["--temp-dir", temp]
    address = f"ray://127.0.0.1:{client_port}"
    try:
        subprocess.run(argv, cwd=REPO, env=env, check=True, capture_output=True, timeout=120)
        _first_connection(address)
        yield address
    finally:
        # Shown with a failing test: why a Ray client server did not start, if one did not.
        for log in sorted(Path(temp).glob("session_*/logs/ray_client_server*.err")):
            text = log.read_text(errors="replace").strip()
            if text:
                print(f"--- {log.name}:\n{text[-3000:]}")
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def _first_connection(address: str, attempts: int = 3) -> None:
    """Connect once before the flow does: on a loaded machine the first client's server
    can fail to start (its first imports are slow); the cluster is then known to answer."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(address=address, logging_level="WARNING")
            assert ray.get(ray.put(1)) == 1
            return
        except ConnectionError:
            if attempt == attempts:
                raise
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def one_thread_reference(
    prefect_harness: None, s3_source: tuple[str, str], s3_endpoint: str
) -> dict[str, tuple[bytes, bytes]]:
    """The local run with one torch thread, as each Ray worker runs a task (Ray sets
    OMP_NUM_THREADS=1 for a task that claims one CPU): the same kernels, the same bits."""
    import torch
    from clipbatch_flows.embed import embed_dataset

    source, bucket = s3_source
    dest = f"s3://{bucket}/emb/local-one-thread"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary = embed_dataset(shared.make_config(source, dest, s3_endpoint))
    finally:
        torch.set_num_threads(threads)
    assert summary["shards_committed"] == 6
    reference, _ = shared.embeddings_by_key(dest, s3_endpoint)
    return reference


def staged_by(proxy: FaultProxy) -> dict[str, int]:
    """Shard name -> pid of the process that staged it (a PUT under {dest}/_tmp/)."""
    out = {}
    for ex in proxy.recorded():
        path = unquote(urlsplit(ex.target).path)
        if ex.method != "PUT" or f"/{TMP_DIR}/" not in path:
            continue
        folder, name = path.split(f"/{TMP_DIR}/", 1)[1].split("/", 1)
        _run, _host, pid, _token = folder.split(SEP)
        out[name.removesuffix(".parquet")] = int(pid)
    return out


def describe(pid: int) -> dict[str, str]:
    """What a process is: its command line and its parent's name."""
    proc = psutil.Process(pid)
    parent = proc.parent()
    return {"cmdline": " ".join(proc.cmdline()), "parent": parent.name() if parent else ""}


def test_ray_run_equals_local_run(
    prefect_harness: None,
    ray_address: str,
    s3_source: tuple[str, str],
    s3_endpoint: str,
    local_reference: dict[str, tuple[bytes, bytes]],
    one_thread_reference: dict[str, tuple[bytes, bytes]],
) -> None:
    from clipbatch_flows.embed import embed_dataset

    source, bucket = s3_source
    dest = f"s3://{bucket}/emb/ray"
    proxy = FaultProxy(s3_endpoint).start()  # the tasks reach moto through it
    processes: dict[int, dict[str, str]] = {}
    done = threading.Event()

    def watch() -> None:
        # Look each staging pid up while the run goes, while its process surely lives.
        while not done.wait(0.02):
            for pid in set(staged_by(proxy).values()) - set(processes):
                try:
                    processes[pid] = describe(pid)
                except psutil.NoSuchProcess:
                    processes[pid] = {"cmdline": "<gone>", "parent": ""}

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        config = shared.make_config(
            source, dest, proxy.url, task_runner=ray_address, gpus_per_shard=1,
            shard_concurrency=2,
        )  # fmt: skip
        summary = embed_dataset(config)
    finally:
        done.set()
        watcher.join(10)
        proxy.stop()
    assert summary["shards_committed"] == 6 and summary["shards_failed"] == 0
    got, files = shared.embeddings_by_key(dest, s3_endpoint)
    assert files == [f"{i:05d}.parquet" for i in range(6)]
    # Byte for byte, both towers, every key, against the local run with the workers' one
    # thread. (Against the multi-threaded local run, the float32 sums run in another
    # order and the last bits differ: measured on this machine, so not asserted equal.)
    assert got == one_thread_reference
    assert sorted(got) == sorted(local_reference)
    for key, (image, text) in local_reference.items():
        for ours, theirs in zip(got[key], (image, text), strict=True):
            a, b = np.frombuffer(ours, np.float32), np.frombuffer(theirs, np.float32)
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=key)

    # Every shard was staged by a Ray worker process, none by this (the driver's) process.
    by_shard = staged_by(proxy)
    assert sorted(by_shard) == [f"{i:05d}" for i in range(6)], by_shard
    pids = set(by_shard.values())
    assert os.getpid() not in pids
    for pid in pids:
        if pid not in processes:  # staged after the watcher's last look
            processes[pid] = describe(pid)
        seen = processes[pid]
        assert seen["cmdline"].startswith("ray::"), (pid, seen)
        assert seen["parent"] == "raylet", (pid, seen)
