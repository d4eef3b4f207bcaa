"""A real Prefect server for the tests that need one (deployments, triggers, workers).

``prefect_test_harness`` runs no trigger services and no workers, so deployments are
tested against ``prefect server start`` in a subprocess, on loopback, with its own
PREFECT_HOME and database.

The database is PostgreSQL, as in production (Prefect's self-hosting guide; SQLite locks
and answers 503 under a backfill's fan-out): one cluster for the whole test session
(tests/postgres.py: initdb + pg_ctl from Debian's ``postgresql``, as the ``postgres``
user, on 127.0.0.1), started by the first server, and a fresh database per server. It
is stopped and removed when the test process exits (and by its watchdog if the process
dies). A machine without PostgreSQL falls back to SQLite, and says so: a
``SQLiteFallbackWarning`` in the pytest summary and the first line of each server's log;
PostgreSQL that is there but fails to start is an error, not a fallback.
``CLIPBATCH_TEST_DATABASE`` chooses: ``auto`` (the default), ``postgresql`` (no fallback:
an error without it) or ``sqlite``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import free_port
from tests.postgres import PostgresCluster, PostgresUnavailable, start_cluster

PREFECT = [sys.executable, "-m", "prefect"]
# What the server logs for each 503 (PREFECT_SERVER_LOG_RETRYABLE_ERRORS) and each 500.
RETRYABLE_LINE = "Encountered retryable exception in request"
ERROR_LINE = "Encountered exception in request"


class SQLiteFallbackWarning(UserWarning):
    """The Prefect server under test runs on SQLite, not PostgreSQL as in production."""


@dataclass
class PrefectServer:
    api: str
    env: dict[str, str]  # what clients of this server (CLI, workers) run with
    home: Path
    process: subprocess.Popen
    database: str = "sqlite"  # or "postgresql"

    @property
    def log(self) -> Path:
        return self.home / "server.log"

    @property
    def on_postgresql(self) -> bool:
        return self.database == "postgresql"

    def busy_answers(self) -> int:
        """How many requests the server has answered 503 so far (from any client)."""
        return self.log.read_text(errors="replace").count(RETRYABLE_LINE)

    def error_answers(self) -> int:
        """How many requests the server has answered 500 so far."""
        return self.log.read_text(errors="replace").count(ERROR_LINE)


_lock = threading.Lock()
_cluster: PostgresCluster | None = None
_unavailable: str | None = None  # why there is no cluster, once found out


def session_postgres() -> PostgresCluster | None:
    """The session's PostgreSQL cluster, started on first use; None where there is no
    PostgreSQL (or CLIPBATCH_TEST_DATABASE=sqlite): the caller falls back to SQLite."""
    global _cluster, _unavailable
    mode = os.environ.get("CLIPBATCH_TEST_DATABASE", "auto").lower()
    if mode not in ("auto", "postgresql", "sqlite"):
        raise ValueError(f"CLIPBATCH_TEST_DATABASE={mode!r}: auto, postgresql or sqlite")
    if mode == "sqlite":
        return None
    with _lock:
        if _cluster is None and _unavailable is None:
            try:
                _cluster = start_cluster()
            except PostgresUnavailable as e:
                _unavailable = str(e)
            else:
                atexit.register(stop_session_postgres)
        if _cluster is None and mode == "postgresql":
            raise RuntimeError(f"CLIPBATCH_TEST_DATABASE=postgresql, but {_unavailable}")
        return _cluster


def current_postgres() -> PostgresCluster | None:
    """The session's cluster if one was started; starts nothing."""
    return _cluster


def stop_session_postgres() -> None:
    """Stop and remove the session's cluster (at the session's end, else at exit; safe to
    call more than once)."""
    global _cluster
    with _lock:
        cluster, _cluster = _cluster, None
    if cluster is not None:
        cluster.stop()


def database_url(home: Path) -> tuple[str, str, str]:
    """(connection URL, "postgresql" or "sqlite", a line that says which and why)."""
    cluster = session_postgres()
    if cluster is not None:
        url = cluster.url(cluster.createdb())
        return url, "postgresql", f"database: {cluster.version}, {url}"
    why = _unavailable or "CLIPBATCH_TEST_DATABASE=sqlite"
    message = (
        f"Prefect server under test on SQLite, not PostgreSQL as in production: {why}. "
        "Its deployment tests may see 503s (a busy database) that production would not."
    )
    warnings.warn(message, SQLiteFallbackWarning, stacklevel=4)
    return f"sqlite+aiosqlite:///{home}/prefect.db", "sqlite", f"database: {message}"


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
        # prefect_server() replaces it with the session's PostgreSQL where there is one.
        PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_WORKER_PREFETCH_SECONDS="1",
        PREFECT_LOGGING_LEVEL="INFO",
        # Each 503 (a retryable database error: SQLite busy, a dropped connection) is
        # logged, so the tests and the load benchmark can count them all, whoever asked.
        PREFECT_SERVER_LOG_RETRYABLE_ERRORS="true",
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
def prefect_server(
    home: Path, python: str = sys.executable, database: str | None = None, **env: str
) -> Iterator[PrefectServer]:
    """``prefect server start`` on a free loopback port, healthy, stopped at the end; on
    a fresh database of the session's PostgreSQL cluster (SQLite without one), or on
    ``database``, a connection URL, when given."""
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    home.mkdir(parents=True, exist_ok=True)
    if database is None:
        url, database, line = database_url(home)
    else:
        url, database = database, database.split(":", 1)[0].split("+", 1)[0]
        line = f"database: {url}"
    full_env = {**base_env(home, api), "PREFECT_API_DATABASE_CONNECTION_URL": url, **env}
    log = home / "server.log"
    with log.open("w") as out:
        out.write(f"# clipbatch tests: {line}\n")
        out.flush()
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
            yield PrefectServer(api, full_env, home, proc, database)
        finally:
            stop(proc)
