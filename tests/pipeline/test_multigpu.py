"""One worker process per device: explicit device per process, shards spread, lost workers retried."""

from __future__ import annotations

import json
import os
import threading
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from clipbatch.config import build_config
from clipbatch.errors import ConfigError, is_transient
from clipbatch.pipeline.devices import (
    DevicePool,
    WorkerLostError,
    device_pool,
    resolve_devices,
)
from clipbatch.process import process_context
from clipbatch.synthetic import write_webdataset
from tests.multigpu_targets import die_on, report


@pytest.mark.timeout(120)
def test_each_worker_process_gets_its_own_device_and_jobs_spread(tmp_path: Path) -> None:
    devices = ["dev0", "dev1", "dev2"]
    pool = DevicePool(devices, report)
    results: list[tuple[str, int, str, int]] = []
    lock = threading.Lock()

    def call(job: int) -> None:
        # No job finishes before every worker holds one (report's rendezvous).
        out = pool.run(job, str(tmp_path), len(devices))
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
    # Each worker checked in once, under its own pid, with its own device.
    checked_in = {int(p.name): p.read_text() for p in tmp_path.iterdir()}
    assert checked_in == {next(iter(p)): d for d, p in pid_of.items()}


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
@pytest.mark.timeout(300)
def test_flow_spreads_shards_over_device_workers(tmp_path: Path, prefect_harness: None) -> None:
    from clipbatch_flows.embed import embed_dataset

    src = tmp_path / "src"
    write_webdataset(src, shards=4, per_shard=6, seed=3, size=64)
    dest = tmp_path / "out"
    config = build_config(
        {
            "source": str(src),
            "dest": str(dest),
            "model": "tiny",
            # shard_concurrency stays 1: the flow widens its window to one shard per device.
            "runtime": {"device": "cpu", "devices": ["cpu", "cpu"], "batch_size": 4},
        }
    )
    progress: list[int] = []
    process_context().progress = progress.append  # the CLI's bar, fed from the workers
    try:
        summary = embed_dataset(config)
    finally:
        process_context().progress = None
        device_pool(["cpu", "cpu"]).close()
    assert summary["shards_committed"] == 4 and summary["rows_written"] == 24
    assert sum(progress) == 24 and len(progress) >= 4
    pids = set()
    for name in ["00000", "00001", "00002", "00003"]:
        meta = json.loads(pq.read_metadata(dest / f"{name}.parquet").metadata[b"clipbatch"])
        assert meta["run"]["device"] == "cpu"
        assert pq.read_table(dest / f"{name}.parquet").num_rows == 6
        pids.add(meta["run"]["worker_pid"])
    assert len(pids) == 2 and os.getpid() not in pids  # both device workers took shards
