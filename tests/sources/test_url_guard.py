"""Image URLs reach what the guard allows, checked after DNS, and never through a proxy.

Against real loopback servers: an HTTP image server that counts the requests it gets, and
a tiny HTTP proxy that counts the connections it gets. A host name that resolves to
loopback is refused like the loopback literal; and with HTTP_PROXY set, an allowed fetch
goes straight to the server while the proxy sees nothing (the same proxy does see a
plain urllib fetch, so it would have counted one).
"""

from __future__ import annotations

import socket
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from clipbatch.config import SourceConfig
from clipbatch.records import BLOCKED_URL
from clipbatch.sources.fetch import Fetcher

BODY = b"\xff\xd8\xff\xe0 not really a jpeg, but bytes to fetch"


class _ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


class _ProxyHandler(BaseHTTPRequestHandler):
    """A forward proxy that answers every request itself (it never forwards)."""

    def do_GET(self) -> None:  # noqa: N802
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        body = b"from the proxy"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _CountingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.paths: list[str] = []
        self.connections = 0

    def get_request(self) -> tuple[socket.socket, object]:
        conn = super().get_request()
        self.connections += 1  # every accepted connection, whatever it then sends
        return conn


def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[_CountingServer]:
    server = _CountingServer(handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def image_server() -> Iterator[_CountingServer]:
    yield from _serve(_ImageHandler)


@pytest.fixture
def proxy_server() -> Iterator[_CountingServer]:
    yield from _serve(_ProxyHandler)


def fetcher(**source: object) -> Fetcher:
    return Fetcher(SourceConfig(url="s3://b/table.parquet", fetch_retries=0, **source))


def test_a_host_name_that_resolves_to_loopback_is_blocked(image_server: _CountingServer) -> None:
    port = image_server.server_address[1]
    assert {a[4][0] for a in socket.getaddrinfo("localhost", port)} & {"127.0.0.1", "::1"}
    got = fetcher().fetch(f"http://localhost:{port}/cat.jpg")  # default allow_networks: none
    assert got.status == BLOCKED_URL and got.data is None
    assert got.error and "loopback" in got.error and "allow_networks" in got.error
    assert image_server.connections == 0 and image_server.paths == []  # never reached
    # The same server, allowed: the name resolves and the fetch succeeds, so the refusal
    # above was the guard's, not a dead server's.
    allowed = fetcher(allow_networks=["127.0.0.0/8", "::1/128"]).fetch(
        f"http://localhost:{port}/cat.jpg"
    )
    assert allowed.status is None and allowed.data == BODY
    assert image_server.paths == ["/cat.jpg"]


def test_environment_proxies_are_not_used_for_image_urls(
    image_server: _CountingServer,
    proxy_server: _CountingServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    proxy = f"http://127.0.0.1:{proxy_server.server_address[1]}"
    for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
        monkeypatch.setenv(name, proxy)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    url = f"http://127.0.0.1:{image_server.server_address[1]}/dog.jpg"
    # The proxy counts: a plain urllib fetch with these variables goes through it.
    with urllib.request.urlopen(url, timeout=10) as r:
        assert r.read() == b"from the proxy"
    assert proxy_server.connections == 1 and proxy_server.paths == [url]
    assert image_server.paths == []

    got = fetcher(allow_networks=["127.0.0.0/8"]).fetch(url)
    assert got.status is None and got.data == BODY  # fetched, directly
    assert image_server.paths == ["/dog.jpg"]
    assert proxy_server.connections == 1  # the one above: the fetcher never connected
