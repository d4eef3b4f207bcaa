"""A clean stop: SIGTERM or SIGINT to ``clipbatch run`` mid-run leaves no process behind.

Kubernetes evictions, spot reclaims and Prefect cancellations send SIGTERM; a person at
a terminal sends SIGINT. Either way the run records what it committed (the run record
says ``cancelled``), stops every child it started (the temporary Prefect server) and
exits; a rerun then completes exactly: every shard once, every key once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from clipbatch.query.validate import validate
from clipbatch.synthetic import write_webdataset
from clipbatch.tables.table import open_table
from tests.flows.test_cli_server import cli_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SHARDS = 24


def start_run(data: Path, dest: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "clipbatch_flows.cli.main", "run", "--source", str(data),
            "--dest", str(dest), "--model", "tiny", "--device", "cpu", "--no-progress",
            "--batch-size", "4"]  # fmt: skip
    return subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for(condition, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_mid_run_stops_everything_and_a_rerun_completes(tmp_path: Path, sig, code) -> None:
    data, dest, home = tmp_path / "wds", tmp_path / "emb", tmp_path / "prefect-home"
    write_webdataset(data, shards=SHARDS, per_shard=6, seed=9, size=48)
    env = cli_env(home)
    proc = start_run(data, dest, env)
    try:
        # Mid-run: some shards committed, not all.
        wait_for(lambda: len(list(dest.glob("*.parquet"))) >= 2, 180, "two committed shards")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the run should have started a temporary Prefect server"
        os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err[-3000:]
    assert "committed shards are kept" in err
    assert len(list(dest.glob("*.parquet"))) < SHARDS, "the run ended before the signal"
    # Nothing the run started survives it.
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    [record] = [json.loads(p.read_text()) for p in (dest / "_lineage").glob("*.json")]
    assert record["status"] == "cancelled"
    assert record["progress"]["committed"] >= 2
    # The rerun goes on from what was committed and finishes exactly.
    rerun = subprocess.run(
        [sys.executable, "-m", "clipbatch_flows.cli.main", "run", "--source", str(data),
         "--dest", str(dest), "--model", "tiny", "--device", "cpu", "--no-progress", "--json"],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert summary["shards_skipped"] >= 2
    assert summary["shards_skipped"] + summary["shards_committed"] == SHARDS
    table = open_table(str(dest))
    keys = table.read_all(["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == SHARDS * 6
    assert not (dest / "_tmp").exists()
    assert validate(table).ok


def test_a_sigint_while_an_event_loop_runs_still_stops_the_run() -> None:
    """``asyncio.run`` turns Python's SIGINT handler into a cancel of its task; a task
    that swallows it ends normally and the SIGINT is lost (the run went on, exit 0: seen
    once in this module's test). The run's handler raises KeyboardInterrupt whatever
    runs in the main thread."""
    import asyncio

    from clipbatch_flows.cli.execute import stop_on_sigterm

    async def swallows_a_cancel() -> str:
        try:
            signal.raise_signal(signal.SIGINT)
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "went on"
        return "not interrupted"

    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert asyncio.run(swallows_a_cancel()) == "went on"  # Python's handler: lost
    with stop_on_sigterm(), pytest.raises(KeyboardInterrupt):
        asyncio.run(swallows_a_cancel())
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
