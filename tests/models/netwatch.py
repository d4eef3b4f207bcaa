"""Count what a block of code tries on the network: socket connects and name lookups.

pytest-socket already refuses every address but loopback; this says whether a connection
or a DNS lookup was even attempted (a refused one included), which is what "offline"
means. The socket methods are wrapped, not replaced: each call still goes through.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def network_attempts() -> Iterator[list[tuple[str, Any]]]:
    """Yields a list that collects (call, address) for every connect and getaddrinfo."""
    attempts: list[tuple[str, Any]] = []
    saved = {
        "connect": socket.socket.connect,
        "connect_ex": socket.socket.connect_ex,
        "getaddrinfo": socket.getaddrinfo,
    }

    def connect(self: socket.socket, address: Any) -> Any:
        attempts.append(("connect", address))
        return saved["connect"](self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        attempts.append(("connect_ex", address))
        return saved["connect_ex"](self, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        attempts.append(("getaddrinfo", host))
        return saved["getaddrinfo"](host, *args, **kwargs)

    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.getaddrinfo = getaddrinfo
    try:
        yield attempts
    finally:
        socket.socket.connect = saved["connect"]  # type: ignore[method-assign]
        socket.socket.connect_ex = saved["connect_ex"]  # type: ignore[method-assign]
        socket.getaddrinfo = saved["getaddrinfo"]
