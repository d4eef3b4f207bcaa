"""``clipbatch run`` as users start it: a fresh process, with or without a Prefect server.

Without ``PREFECT_API_URL`` the CLI starts Prefect's temporary server itself, early, and
runs the flow against it (flows/warmup.py); with an API named only in a Prefect profile,
it must use that server and not a throwaway one.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from clipbatch.synthetic import write_webdataset

pytestmark = pytest.mark.timeout(300)


def cli_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # A fresh database is migrated on first start: slow on a busy CI machine.
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180",
        **extra,
    )
    return env


def run_cli(data: Path, dest: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "clipbatch_flows.cli.main", "run", "--source", str(data),
            "--dest", str(dest), "--model", "tiny", "--device", "cpu", "--no-progress"]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=240)


def flow_run_ids(dest: Path) -> list[str]:
    return sorted(p.stem for p in (dest / "_lineage").glob("*.json"))


def test_cli_starts_a_temporary_server_and_records_the_run_in_it(tmp_path: Path) -> None:
    data, dest, home = tmp_path / "wds", tmp_path / "emb", tmp_path / "prefect-home"
    write_webdataset(data, shards=2, per_shard=6, seed=3, size=64)

    proc = run_cli(data, dest, cli_env(home))

    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "12 written: 12 ok, 0 failed" in proc.stdout
    assert sorted(p.name for p in dest.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
    [run_id] = flow_run_ids(dest)
    # The flow ran against the temporary server: its database, under PREFECT_HOME, holds
    # the completed flow run and both shard task runs.
    with sqlite3.connect(home / "prefect.db") as db:
        [(state,)] = db.execute("select state_type from flow_run where id = ?", (run_id,))
        tasks = db.execute(
            "select state_type from task_run where flow_run_id = ? and name like 'encode-%'",
            (run_id,),
        ).fetchall()
        # Events travel through Prefect's queue and the server's batched writer: the
        # CLI drains the queue before it stops the server, which flushes on shutdown.
        events = dict(db.execute("select event, count(*) from events group by event").fetchall())
    assert state == "COMPLETED"
    assert sorted(tasks) == [("COMPLETED",), ("COMPLETED",)]
    assert events.get("clipbatch.shard.committed") == 2
    assert events.get("prefect.flow-run.Completed") == 1


def test_cli_uses_the_server_a_profile_names(prefect_harness, tmp_path: Path) -> None:
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    data, dest, home = tmp_path / "wds", tmp_path / "emb", tmp_path / "prefect-home"
    write_webdataset(data, shards=1, per_shard=4, seed=4, size=64)
    home.mkdir()
    # Named in the profile only, not in the environment: the CLI starts a temporary
    # server speculatively before it can read profiles, and must drop it.
    (home / "profiles.toml").write_text(
        f'active = "team"\n[profiles.team]\nPREFECT_API_URL = "{PREFECT_API_URL.value()}"\n'
    )

    proc = run_cli(data, dest, cli_env(home))

    assert proc.returncode == 0, proc.stderr[-3000:]
    [run_id] = flow_run_ids(dest)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    assert run.state is not None and run.state.is_completed()


def test_a_temporary_server_that_never_answers_is_a_clean_error(tmp_path: Path) -> None:
    data, dest, home = tmp_path / "wds", tmp_path / "emb", tmp_path / "prefect-home"
    write_webdataset(data, shards=1, per_shard=2, seed=5, size=64)
    env = cli_env(home)
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "0"

    proc = run_cli(data, dest, env)

    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "temporary server did not answer within 0 s" in proc.stderr
    assert "set PREFECT_API_URL" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(dest.glob("*.parquet"))


def test_the_shutdown_path_leaves_a_clean_stderr_run_after_run(tmp_path: Path) -> None:
    """Stopping the temporary server while its services run made Prefect print a
    cancellation traceback, now and then (1 run in 8). Its output goes to a log file
    now: run after run, stderr stays empty and no log file is left behind."""
    data, home = tmp_path / "wds", tmp_path / "prefect-home"
    write_webdataset(data, shards=1, per_shard=4, seed=6, size=64)
    env = cli_env(home, TMPDIR=str(tmp_path))
    for i in range(3):
        proc = run_cli(data, tmp_path / f"emb{i}", env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stderr == "", proc.stderr
    assert not list(tmp_path.glob("clipbatch-prefect-server-*.log"))
