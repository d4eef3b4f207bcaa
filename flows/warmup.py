"""Start Prefect's temporary server early, so CLI runs don't wait for it (CLI runs only).

Without ``PREFECT_API_URL``, Prefect starts a temporary API server in a subprocess on the
first API call and waits for it. Two things made that slow here (2 cores):

- Prefect's launcher lives in ``prefect.server.api.server``, and importing that module in
  *this* process costs about 2.4 s of CPU under the GIL, only to spawn the subprocess;
- nothing else can happen while the flow waits for the server.

So we spawn the very same server (Prefect's uvicorn command line, app factory and
environment, with the UI off) ourselves, right at start-up, and point this process at it
with ``temporary_settings``. Meanwhile this process imports torch and loads the model
(cached per process, so the shard task reuses it). The server lives as long as the
process, like Prefect's own temporary server.

Heartbeats are off for flows run against it: nothing watches a server that dies with the
process, and each flow run would otherwise wait up to 1 s for the heartbeat thread.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from clipbatch.config import EmbedConfig
from clipbatch.errors import ClipbatchError

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

# uvicorn exits with 3 when its port was taken between our probe and its bind.
PORT_TAKEN_EXIT_CODE = 3


class TemporaryServerError(ClipbatchError):
    """Prefect's temporary server did not come up (the CLI prints this, exit code 2)."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TemporaryServer:
    """Prefect's temporary API server, launched without importing ``prefect.server`` here.

    Its output goes to a log file, not the user's terminal: a server stopped while its
    background services run prints their cancellation tracebacks (Prefect's in-memory
    messaging consumers), which say nothing about the user's run. The file is kept only
    when the server fails, and its tail is in the error; ``verbose`` shows it live.
    """

    def __init__(self, verbose: bool = False) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.released = False  # told to stop; reaped at exit
        self.verbose = verbose
        self.log_path: Path | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        """Spawn the server; returns at once. :meth:`wait_ready` waits for it."""
        # Found without importing prefect (0.8 s), so the server starts first thing.
        spec = importlib.util.find_spec("prefect")
        if spec is None or not spec.submodule_search_locations:
            raise TemporaryServerError("prefect is not installed")
        app_dir = Path(next(iter(spec.submodule_search_locations))).parent
        self.port = _free_port()
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            # Private switches, on purpose: they are the ones Prefect's own temporary server
            # (SubprocessASGIServer) sets, and select its ephemeral mode, which runs only the
            # services a temporary server needs. No public setting selects it: the public
            # `prefect server start` runs every service (scheduler, foreman, late runs,
            # triggers) on the cores the decoders need, and the public launcher class costs
            # a 2.4 s GIL-bound import of prefect.server on the critical path, which the
            # 2.5x wall-clock target (bench/RESULTS.md) cannot spare. Measured here on 2
            # cores: time to /health is the same either way (6-8 s, noisy); what differs is
            # the import and the background services.
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        command = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir),
                   "--factory", "prefect.server.api.server:create_app",
                   "--host", "127.0.0.1", "--port", str(self.port),
                   "--log-level", "error", "--lifespan", "on"]  # fmt: skip
        output = None
        if not self.verbose:
            fd, name = tempfile.mkstemp(prefix="clipbatch-prefect-server-", suffix=".log")
            self.log_path = Path(name)
            output = os.fdopen(fd, "wb")
        try:
            self.process = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT if output else None,
            )
        finally:
            if output is not None:
                output.close()  # the child holds its own descriptor
        atexit.register(self.stop)

    def wait_ready(self, timeout: float) -> str:
        """Wait until ``/health`` answers; restart on a lost port race. Returns the API URL."""
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                assert self.process is not None
                code = self.process.poll()
                if code == PORT_TAKEN_EXIT_CODE:
                    self.start()
                    continue
                if code is not None:
                    raise TemporaryServerError(
                        f"Prefect's temporary server exited with code {code}; "
                        "set PREFECT_API_URL to use a running server instead" + self._log_tail()
                    )
                if self._healthy(client):
                    return self.api_url
                time.sleep(0.05)
        raise TemporaryServerError(
            f"Prefect's temporary server did not answer within {timeout:.0f} s; "
            "set PREFECT_API_URL to use a running server instead" + self._log_tail()
        )

    def _log_tail(self, lines: int = 20) -> str:
        """The end of the server's log, for an error message; the file is kept."""
        path = self.log_path
        if path is None or not path.is_file():
            return ""
        self.log_path = None  # not removed at exit: the message names it
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        return f"\nits log, {path}:\n" + "\n".join(tail)

    def _healthy(self, client: httpx.Client) -> bool:
        import httpx

        try:
            return client.get(f"{self.api_url}/health").status_code == 200
        except httpx.TransportError:
            return False

    def warm_up_in_background(self) -> None:
        """Make the server's first real requests cheap while this process still loads.

        The first API calls of a fresh server are slow (about 0.2 s: database engine,
        query compilation); made here, they overlap the model load instead of delaying
        the flow. Failures are ignored: the flow's own calls report real problems.
        """

        def warm() -> None:
            import httpx

            deadline = time.monotonic() + 60
            with httpx.Client(timeout=5.0) as client:
                while time.monotonic() < deadline and self.process is not None:
                    if self._healthy(client):
                        with contextlib.suppress(httpx.HTTPError):
                            client.get(f"{self.api_url}/admin/version")
                            client.post(f"{self.api_url}/flows/filter", json={"limit": 1})
                        return
                    time.sleep(0.05)

        threading.Thread(target=warm, name="prefect-server-warm-up", daemon=True).start()

    def release(self) -> None:
        """After the flow: deliver Prefect's queued logs and events, then let the server
        shut down while the CLI prints its summary; :meth:`stop` reaps it at exit."""
        if self.process is None or self.released:
            return
        from prefect.events.worker import EventsWorker
        from prefect.logging.handlers import APILogWorker

        for service in (EventsWorker, APILogWorker):
            service.drain_all(timeout=10)
        self.released = True
        self.process.terminate()

    def stop(self) -> None:
        # atexit order matters: Prefect drains its log and event queues in threading's
        # exit hooks, which run before atexit's, so they reach the server before it goes.
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.released = False
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
            self.log_path = None


def _start_temporary_server(verbose: bool = False) -> TemporaryServer:
    server = TemporaryServer(verbose)
    server.start()
    server.warm_up_in_background()
    return server


class WarmStart:
    """Started first thing in a CLI run; enter :meth:`session` around the flow call."""

    def __init__(self, config: EmbedConfig, verbose: bool = False) -> None:
        self.config = config
        self.server: TemporaryServer | None = None
        # Whether a server is needed is only known from Prefect's settings (environment,
        # profile), and importing them imports prefect: 0.8 s. When prefect is not loaded
        # yet and the environment names no API, start the server first and ask after.
        speculative = "prefect" not in sys.modules and not os.environ.get("PREFECT_API_URL")
        if speculative:
            self.server = _start_temporary_server(verbose)
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        needed = not PREFECT_API_URL.value() and PREFECT_SERVER_EPHEMERAL_ENABLED.value()
        if needed and self.server is None:
            self.server = _start_temporary_server(verbose)
        elif not needed and self.server is not None:
            self.server.stop()  # a profile names a server after all
            self.server = None

    def close(self) -> None:
        """Stop the temporary server now (a stopped run: nothing more goes to it)."""
        if self.server is not None:
            self.server.stop()

    def preload_model(self) -> None:
        """Load the model (cached per process) while the server boots."""
        if self.config.runtime.devices:  # device workers load their own copies
            return
        try:
            from clipbatch.models.loading import load_model

            runtime = self.config.runtime
            load_model(self.config.model, runtime.device, runtime.precision)
        except Exception as e:  # noqa: BLE001 - the flow loads it again and reports the error
            log.debug("model preload failed; the flow will report it: %s", e)

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Preload the model, wait for the server, and point Prefect at it meanwhile."""
        self.preload_model()
        if self.server is None:
            yield
            return
        from prefect.settings import (
            PREFECT_API_URL,
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
            PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
            temporary_settings,
        )

        url = self.server.wait_ready(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        with temporary_settings({PREFECT_API_URL: url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield
            self.server.release()
