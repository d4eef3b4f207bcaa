"""docker/entrypoint.sh stops the worker within docker's grace period, without Docker.

`docker stop` sends SIGTERM to the container's main process (tini, which passes it on to
the entrypoint) and SIGKILLs everything 10 s later. Prefect's process worker acts on
SIGINT only (its SIGTERM handler sends SIGINT to itself), so the entrypoint runs the worker
in the background with SIGINT at its default, sends it SIGINT on SIGTERM, and kills the
worker and its flow-run processes if they are not gone after CLIPBATCH_STOP_TIMEOUT.

Here the entrypoint runs as a subprocess against a real `prefect server start` on
loopback, with a real worker (idle, and with a flow run sleeping in it), and a stand-in
`prefect` whose worker ignores every signal (the kill path).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import free_port
from tests.paths import REPO
from tests.prefect_server import PrefectServer, prefect_server

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent
TINI = "/usr/bin/tini"
GRACE = 10.0  # docker stop's default grace period, seconds

SLEEPY_FLOW = """\
import os
import time
from pathlib import Path

from prefect import flow


@flow
def sleepy() -> None:
    Path(__file__).with_name("flow-run.pid").write_text(str(os.getpid()))
    time.sleep(600)
"""

# Stands in for the prefect CLI: pool and queue commands succeed; `worker start` is a
# worker that ignores SIGINT and SIGTERM, with a child in its own session, as Prefect
# starts flow runs.
DEAF_PREFECT = """\
#!/usr/bin/env bash
if [[ ${1:-} == worker ]]; then
    trap '' INT TERM
    "$FAKE_PYTHON" -c 'import os, time; os.setsid(); time.sleep(600)' &
    echo "$$ $!" > "$FAKE_PIDS"
    wait
fi
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    with prefect_server(tmp_path_factory.mktemp("prefect-home")) as s:
        yield s


@pytest.fixture(autouse=True)
def _needs_curl() -> None:
    if shutil.which("curl", path=_path()) is None:
        pytest.skip("the entrypoint waits for the API with curl: apt-get install curl")


def _path(*first: Path) -> str:
    return os.pathsep.join([*map(str, first), str(VENV_BIN), os.environ.get("PATH", "")])


def _launcher(name: str) -> list[str]:
    if name == "tini":
        if not Path(TINI).exists():
            pytest.skip(f"{TINI} not found: apt-get install tini")
        return [TINI, "--"]
    return []


def _env(api: str, pool: str, base: dict[str, str], **extra: str) -> dict[str, str]:
    return {
        **base,
        "PATH": _path(),
        "PREFECT_API_URL": api,
        "CLIPBATCH_WORK_POOL": pool,
        "CLIPBATCH_WORKER_LIMIT": "2",
        "CLIPBATCH_GPU_SLOTS": "1",
        "CLIPBATCH_DEPLOY_ON_START": "0",
        **extra,
    }


@contextlib.contextmanager
def _entrypoint(launcher: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """`[tini --] bash docker/entrypoint.sh worker`; whatever it leaves is killed at the end."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            [*launcher, "bash", str(ENTRYPOINT), "worker"],
            env=env,
            cwd=log.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a signal for the test's group never reaches it
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(psutil.Error):
            for p in [*psutil.Process(proc.pid).children(recursive=True), proc]:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        proc.kill()
        proc.wait()


def _wait_for(what: str, check: Callable[[], bool], proc: subprocess.Popen, log: Path,
              timeout: float = 120) -> None:  # fmt: skip
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if proc.poll() is not None:
            raise AssertionError(f"entrypoint exited ({proc.returncode}) before {what}:\n"
                                 f"{log.read_text()[-4000:]}")  # fmt: skip
        time.sleep(0.3)
    raise AssertionError(f"no {what} after {timeout}s:\n{log.read_text()[-4000:]}")


def _workers(api: str, pool: str) -> list[dict]:
    r = httpx.post(f"{api}/work_pools/{pool}/workers/filter", json={}, timeout=10)
    return r.json() if r.status_code == 200 else []


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _workers_running(pool: str) -> list[str]:
    """Processes whose command line names a worker of this pool."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "worker" in cmd and pool in cmd and _alive(p.pid):
            found.append(f"{p.pid}: {cmd}")
    return found


def _stop(proc: subprocess.Popen) -> tuple[int, float, list[int]]:
    """docker stop's SIGTERM to the main process: (exit status, seconds, what was below it)."""
    below = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout=GRACE)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {GRACE}s after SIGTERM") from None
    return rc, time.monotonic() - start, below


def _deploy_sleepy(api: str, pool: str, where: Path) -> str:
    """A deployment of a flow that sleeps, on this pool, and a run of it: the run's id."""
    where.mkdir()
    (where / "sleepy.py").write_text(SLEEPY_FLOW)
    http = httpx.Client(base_url=api, timeout=10)
    flow_id = http.post("/flows/", json={"name": f"sleepy-{pool}"}).raise_for_status().json()["id"]
    dep = http.post("/deployments/", json={
        "name": "sleepy",
        "flow_id": flow_id,
        "work_pool_name": pool,
        "work_queue_name": "default",
        "entrypoint": "sleepy.py:sleepy",
        "path": str(where),
        "pull_steps": [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(where)}}
        ],
    }).raise_for_status().json()  # fmt: skip
    run = http.post(f"/deployments/{dep['id']}/create_flow_run", json={})
    return run.raise_for_status().json()["id"]


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("load", ["idle", "flow-run"])
@pytest.mark.parametrize("launcher", ["bash", "tini"])
def test_sigterm_stops_worker_within_grace(
    server: PrefectServer, tmp_path: Path, launcher: str, load: str
) -> None:
    pool = f"ep-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "entrypoint.log"
    env = _env(server.api, pool, server.env)
    with _entrypoint(_launcher(launcher), env, log) as proc:
        _wait_for("worker polling the pool", lambda: bool(_workers(server.api, pool)), proc, log)
        assert _workers_running(pool), "the worker is not a process of this pool?"
        flow_pid = None
        if load == "flow-run":
            pid_file = tmp_path / "flow" / "flow-run.pid"
            _deploy_sleepy(server.api, pool, tmp_path / "flow")
            _wait_for("flow run sleeping", pid_file.exists, proc, log)
            flow_pid = int(pid_file.read_text())
            assert _alive(flow_pid)

        rc, seconds, below = _stop(proc)

        text = log.read_text()
        assert "SIGTERM: sending SIGINT to the worker" in text, text[-4000:]
        # Stopped by the worker itself, well inside the grace period; nothing killed.
        assert rc == 0, text[-4000:]
        assert seconds < GRACE / 2, (seconds, text[-4000:])
        assert "SIGKILL:" not in text
        assert not _workers_running(pool)
        assert not [pid for pid in below if _alive(pid)], text[-4000:]
        if flow_pid is not None:
            assert not _alive(flow_pid), "the flow-run process outlived the container"


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_worker_deaf_to_signals_is_killed_at_the_deadline(
    server: PrefectServer, tmp_path: Path
) -> None:
    """A worker that ignores SIGINT/SIGTERM (the issue's worker), and its child in
    another session, are SIGKILLed after CLIPBATCH_STOP_TIMEOUT: exit 143, nothing left."""
    pool = f"ep-deaf-{uuid.uuid4().hex[:8]}"
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "prefect").write_text(DEAF_PREFECT)
    (fake_bin / "prefect").chmod(0o755)
    pids = tmp_path / "fake.pids"
    env = _env(server.api, pool, server.env, CLIPBATCH_STOP_TIMEOUT="3")
    env.update(PATH=_path(fake_bin), FAKE_PIDS=str(pids), FAKE_PYTHON=sys.executable)
    log = tmp_path / "entrypoint.log"
    with _entrypoint([], env, log) as proc:
        _wait_for("stand-in worker", lambda: pids.exists() and pids.read_text().strip() != "",
                  proc, log, timeout=60)  # fmt: skip
        worker, child = map(int, pids.read_text().split())
        assert _alive(worker) and _alive(child)

        rc, seconds, _ = _stop(proc)

        text = log.read_text()
        assert rc == 143, text
        assert 1 <= seconds < GRACE, (seconds, text)
        assert "SIGKILL:" in text, text
        assert not _alive(worker) and not _alive(child)
        assert not _workers_running(pool)


@pytest.mark.timeout(60)
def test_sigterm_while_waiting_for_the_api(tmp_path: Path) -> None:
    """Before the worker starts (the API wait), SIGTERM ends the entrypoint at once."""
    api = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    env = _env(api, "ep-nowhere", dict(os.environ))
    log = tmp_path / "entrypoint.log"
    with _entrypoint([], env, log) as proc:
        _wait_for("API wait loop", lambda: bool(psutil.Process(proc.pid).children()), proc, log,
                  timeout=30)  # fmt: skip
        rc, seconds, _ = _stop(proc)
        assert rc in (-signal.SIGTERM, 128 + signal.SIGTERM), rc
        assert seconds < 3, seconds
