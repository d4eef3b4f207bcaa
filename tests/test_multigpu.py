"""One worker process per device: explicit device per process, shards spread, lost workers retried."""

from __future__ import annotations

import os
import threading
import uuid
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clipbatch.config import build_config
from clipbatch.errors import ConfigError, is_transient
from clipbatch.multigpu import (
    DevicePool,
    WorkerLostError,
    device_pool,
    resolve_devices,
    run_shard_on_devices,
)
from clipbatch.plan import plan_shards
from clipbatch.synthetic import write_webdataset
from tests.multigpu_targets import die_on, report


@pytest.mark.timeout(120)
def test_each_worker_process_gets_its_own_device_and_jobs_spread() -> None:
    devices = ["dev0", "dev1", "dev2"]
    pool = DevicePool(devices, report)
    results: list[tuple[str, int, str, int]] = []
    lock = threading.Lock()

    def call(job: int) -> None:
        out = pool.run(job)
        with lock:
            results.append(out)

    try:
        threads = [threading.Thread(target=call, args=(j,)) for j in range(18)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        pool.close()
    assert sorted(r[3] for r in results) == list(range(18))  # every job exactly once
    pid_of: dict[str, set[int]] = {}
    for device, pid, env_device, _ in results:
        assert env_device == device  # the process was told this device explicitly
        pid_of.setdefault(device, set()).add(pid)
    assert set(pid_of) == set(devices)  # every device got work
    assert all(len(p) == 1 for p in pid_of.values())  # one process per device
    pids = {next(iter(p)) for p in pid_of.values()}
    assert len(pids) == 3 and os.getpid() not in pids
    assert max(Counter(r[0] for r in results).values()) < 18


@pytest.mark.timeout(120)
def test_a_lost_worker_is_a_transient_error_and_is_replaced() -> None:
    pool = DevicePool(["dev0"], die_on)
    try:
        assert pool.run(0) == 0
        with pytest.raises(WorkerLostError, match="worker lost") as info:
            pool.run(1)
        assert is_transient(info.value)
        assert pool.run(2) == 2  # a fresh process took the device's place
    finally:
        pool.close()


def test_device_names_are_checked() -> None:
    assert resolve_devices(["cpu", "cpu"]) == ["cpu", "cpu"]
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA sees none"):
            resolve_devices(["all"])
        with pytest.raises(ConfigError, match="not present"):
            resolve_devices(["cuda:3"])
    with pytest.raises(ConfigError, match="unknown device"):
        resolve_devices(["tpu"])


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_shards_run_on_device_workers_and_commit(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_webdataset(src, shards=4, per_shard=6, seed=3, size=64)
    dest = tmp_path / "out"
    config = build_config(
        {
            "source": str(src),
            "dest": str(dest),
            "model": "tiny",
            "runtime": {"device": "cpu", "devices": ["cpu", "cpu"], "batch_size": 4},
        }
    )
    plan = plan_shards(config)
    run_id = uuid.uuid4().hex
    results = {}

    def go(shard) -> None:  # noqa: ANN001 - a ShardSpec
        results[shard.name] = run_shard_on_devices(
            shard, config, run_id, plan.fingerprints[shard.name], {"flow_run_id": run_id}
        )

    threads = [threading.Thread(target=go, args=(s,)) for s in plan.todo]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool = device_pool(["cpu", "cpu"])
    pool.close()
    assert sorted(results) == ["00000", "00001", "00002", "00003"]
    assert all(r.status == "committed" and r.rows == 6 for r in results.values())
    for name in results:
        meta = pq.read_metadata(dest / f"{name}.parquet").metadata
        assert b'"device": "cpu"' in meta[b"clipbatch"]
        assert pq.read_table(dest / f"{name}.parquet").num_rows == 6
