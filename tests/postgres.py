"""A throwaway PostgreSQL cluster from the machine's own server binaries (Debian's
``postgresql`` package: /usr/lib/postgresql/<major>/bin), for the Prefect servers of the
tests and of ``bench/prefect_load.py``.

``initdb`` + ``pg_ctl`` as the ``postgres`` user when run as root (PostgreSQL refuses to
run as root), else as the caller; the data directory is a fresh folder under the system
temporary directory owned by that user. The cluster listens on 127.0.0.1 on a free port
(and a unix socket in its data directory), with trust authentication: a test cluster. A
fresh database per Prefect server (``createdb``). ``stop()`` stops it (``pg_ctl stop -m
fast``, then ``immediate``, then SIGKILL) and removes the folder; a watchdog process
does the same if the process that started it dies without stopping it (a hard timeout,
``os._exit``, SIGKILL), so no postgres process outlives it.

No third-party imports: the watchdog runs this file as a script.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here, or no user that may run them."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_bindir() -> Path | None:
    """$CLIPBATCH_PG_BINDIR, else the newest /usr/lib/postgresql/*/bin, else pg_ctl on PATH."""
    explicit = os.environ.get("CLIPBATCH_PG_BINDIR")
    candidates = [explicit] if explicit else []
    candidates += sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
        reverse=True,
    )
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for c in candidates:
        if all((Path(c) / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(c)
    return None


def _runas() -> tuple[list[str], int | None, int | None]:
    """The command prefix, uid and gid that run the server: postgres when we are root."""
    if os.geteuid() != 0:
        return [], None, None
    try:
        entry = pwd.getpwnam(USER)
    except KeyError as e:
        raise PostgresUnavailable(f"running as root and there is no {USER!r} user") from e
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root and there is no runuser")
    return [runuser, "-u", USER, "--"], entry.pw_uid, entry.pw_gid


@dataclass
class PostgresCluster:
    bindir: Path
    data: Path  # the folder the cluster lives in (pgdata/ and the log inside it)
    port: int
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)  # runuser -u postgres --, as root
    watchdog: subprocess.Popen | None = None
    version: str = ""

    @property
    def pgdata(self) -> Path:
        return self.data / "pgdata"

    @property
    def logfile(self) -> Path:
        return self.data / "postgres.log"

    def tool(self, name: str) -> str:
        return str(self.bindir / name)

    def url(self, dbname: str, driver: str = "postgresql+asyncpg") -> str:
        return f"{driver}://{USER}@{self.host}:{self.port}/{dbname}"

    def createdb(self, name: str | None = None) -> str:
        """A fresh database; returns its name."""
        name = name or f"prefect_{uuid.uuid4().hex[:12]}"
        _check(
            [self.tool("createdb"), "-h", self.host, "-p", str(self.port), "-U", USER, name],
            "createdb",
        )
        return name

    def postmaster_pid(self) -> int | None:
        """The running postmaster's pid, from postmaster.pid; None when it is not running."""
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def stop(self) -> None:
        """Stop the cluster, however it is doing, and remove its folder."""
        try:
            _stop_cluster(self.prefix, self.tool("pg_ctl"), self.pgdata)
        finally:
            shutil.rmtree(self.data, ignore_errors=True)
            if self.watchdog is not None:
                # Its pipe closes: it finds nothing left to stop and exits.
                with contextlib.suppress(OSError):
                    self.watchdog.stdin.close()  # type: ignore[union-attr]
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.watchdog.wait(timeout=30)
                self.watchdog = None


def _check(argv: list[str], what: str, timeout: float = 120) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _stop_cluster(prefix: list[str], pg_ctl: str, pgdata: Path) -> None:
    """pg_ctl stop -m fast, then immediate; then SIGKILL to the postmaster's group."""
    pidfile = pgdata / "postmaster.pid"
    if not pidfile.exists():
        return
    for mode in ("fast", "immediate"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [*prefix, pg_ctl, "stop", "-D", str(pgdata), "-m", mode, "-w", "-t", "20"],
                capture_output=True,
                timeout=40,
            )
        if not pidfile.exists():
            return
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text().split("\n", 1)[0])
        # The postmaster leads its own session (setsid below): its children share the group.
        os.killpg(pid, signal.SIGKILL)


def start_cluster(durable: bool = False, max_connections: int = 300) -> PostgresCluster:
    """initdb + pg_ctl start; raises PostgresUnavailable when there is no PostgreSQL here.

    ``durable=False`` (the tests) turns fsync, full-page writes and synchronous commit
    off: a cluster that is thrown away needs none of them. The benchmark keeps them on.
    """
    bindir = find_bindir()
    if bindir is None:
        raise PostgresUnavailable(
            "no PostgreSQL server binaries (initdb, pg_ctl, postgres) in "
            "/usr/lib/postgresql/*/bin or on PATH; install Debian's `postgresql`"
        )
    prefix, uid, gid = _runas()
    data = Path(tempfile.mkdtemp(prefix="clipbatch-pg-"))
    cluster = PostgresCluster(bindir=bindir, data=data, port=free_port(), prefix=prefix)
    try:
        if uid is not None:
            os.chown(data, uid, gid)  # type: ignore[arg-type]
        data.chmod(0o700)
        _check(
            [*prefix, cluster.tool("initdb"), "-D", str(cluster.pgdata), "-U", USER,
             "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8", "--no-sync"],
            "initdb",
        )  # fmt: skip
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(cluster.port),
            "unix_socket_directories": f"'{cluster.data}'",
            "max_connections": str(max_connections),
            "shared_buffers": "'128MB'",
            "logging_collector": "off",
        }
        if not durable:
            settings.update(fsync="off", full_page_writes="off", synchronous_commit="off")
        with (cluster.pgdata / "postgresql.conf").open("a") as conf:
            conf.write("\n# clipbatch test cluster\n")
            conf.writelines(f"{k} = {v}\n" for k, v in settings.items())
        # The watchdog first: from here on, a death of this process stops the cluster.
        cluster.watchdog = subprocess.Popen(
            [sys.executable, __file__, "watch", json_args(cluster)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a ^C to the tests reaches neither it nor the server
        )
        # pg_ctl starts the postmaster in a session of its own: a ^C to the tests does
        # not reach it, stop() does.
        _check(
            [*prefix, cluster.tool("pg_ctl"), "start", "-D", str(cluster.pgdata),
             "-l", str(cluster.logfile), "-w", "-t", "60"],
            "pg_ctl start",
        )  # fmt: skip
        version = _check([cluster.tool("postgres"), "--version"], "postgres --version")
        cluster.version = version.strip()
    except BaseException as e:
        log = ""
        with contextlib.suppress(OSError):
            log = cluster.logfile.read_text()[-3000:]
        cluster.stop()
        if isinstance(e, RuntimeError) and log:
            raise RuntimeError(f"{e}\npostgres log:\n{log}") from e
        raise
    return cluster


def json_args(cluster: PostgresCluster) -> str:
    import json

    return json.dumps(
        {"prefix": cluster.prefix, "pg_ctl": cluster.tool("pg_ctl"), "data": str(cluster.data)}
    )


@contextlib.contextmanager
def postgres_cluster(durable: bool = False) -> Iterator[PostgresCluster]:
    cluster = start_cluster(durable=durable)
    try:
        yield cluster
    finally:
        cluster.stop()


def _watch(args: str) -> None:
    """Block until the starter's pipe closes (it stopped us, or it died), then make sure
    the cluster is stopped and its folder gone."""
    import json

    spec = json.loads(args)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(Exception):
        sys.stdin.buffer.read()
    data = Path(spec["data"])
    try:
        _stop_cluster(spec["prefix"], spec["pg_ctl"], data / "pgdata")
    finally:
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "watch":
    _watch(sys.argv[2])
