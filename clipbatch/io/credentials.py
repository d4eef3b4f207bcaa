"""Object-store credentials handed to the library in memory (from a Prefect block).

Prefect stores parameters in plain text, so a config only *names* a credentials block
(``storage.credentials_block``). The Prefect layer (``tasks/credentials.py``) loads the
block where the work runs: the flow process, each task's process (Dask and Ray workers
included), and passes them on to per-device worker processes. It registers them here,
and :func:`clipbatch.io.storage.fsspec_kwargs` reads them. They never enter a
config, a parameter, a record, an event or a log line (their ``repr`` is masked).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from clipbatch.errors import ConfigError


@dataclass(frozen=True)
class Credentials:
    """What an S3-compatible client needs; ``repr`` never shows the secret parts."""

    key: str | None = None
    secret: str | None = None
    token: str | None = None
    endpoint_url: str | None = None
    region: str | None = None

    def __repr__(self) -> str:
        return f"Credentials(key={'***' if self.key else None}, endpoint_url={self.endpoint_url!r})"

    def s3_kwargs(self) -> dict[str, str]:
        kwargs = {"key": self.key, "secret": self.secret, "token": self.token}
        return {k: v for k, v in kwargs.items() if v}


_lock = threading.Lock()
_registered: dict[str, Credentials] = {}


def register(block: str, credentials: Credentials) -> None:
    """Make ``credentials`` the ones storage options naming ``block`` use, in this process."""
    with _lock:
        _registered[block] = credentials


def lookup(block: str) -> Credentials:
    with _lock:
        found = _registered.get(block)
    if found is None:
        raise ConfigError(
            f"credentials block {block!r} is not loaded in this process: clipbatch's Prefect "
            "flow and tasks load it from the Prefect API where they run (the library alone "
            "needs clipbatch.io.credentials.register)"
        )
    return found


def registered() -> dict[str, Credentials]:
    """Everything registered here, to hand to a child process (per-device workers)."""
    with _lock:
        return dict(_registered)


def install(credentials: dict[str, Credentials]) -> None:
    """Register what :func:`registered` returned in another process."""
    with _lock:
        _registered.update(credentials)
