"""A real Prefect server for the tests that need one (deployments, triggers, workers).

``prefect_test_harness`` runs no trigger services and no workers, so deployments are
tested against ``prefect server start`` in a subprocess, on loopback, with its own
PREFECT_HOME and database.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port

PREFECT = [sys.executable, "-m", "prefect"]


@dataclass
class PrefectServer:
    api: str
    env: dict[str, str]  # what clients of this server (CLI, workers) run with
    home: Path
    process: subprocess.Popen

    @property
    def log(self) -> Path:
        return self.home / "server.log"


def base_env(home: Path, api: str) -> dict[str, str]:
    """The environment, minus any Prefect setting of the caller, plus this server's."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") and k != "CLIPBATCH_HOME"
    }
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api,
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        PREFECT_LOGGING_LEVEL="INFO",
    )
    return env


def wait_healthy(api: str, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"prefect server not healthy after {timeout}s:\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def prefect_server(home: Path, python: str = sys.executable, **env: str) -> Iterator[PrefectServer]:
    """``prefect server start`` on a free loopback port, healthy, stopped at the end."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    full_env = {**base_env(home, api), **env}
    home.mkdir(parents=True, exist_ok=True)
    log = home / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                python,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=full_env,
            cwd=home,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_healthy(api, proc, log)
            yield PrefectServer(api, full_env, home, proc)
        finally:
            stop(proc)
