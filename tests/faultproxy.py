"""A small fault-injecting HTTP proxy for tests, in front of moto's S3 server.

Clients point their ``endpoint_url`` at the proxy. Each request gets its own
upstream connection (the proxy rewrites ``Connection: close``), so faults can be
aimed at single requests. Faults come from a queue of rules, each matching an HTTP
method and a path substring and firing for its next ``count`` matching requests:

- ``delay``: wait ``seconds`` before forwarding;
- ``slowdown``: answer ``503 SlowDown`` with S3's XML error body;
- ``internal``: answer ``500 InternalError`` (s3fs does not retry it itself; botocore
  does once, as the library configures it, see tests/pipeline/test_faults.py's xfail);
- ``reset``: abort the client's connection with a TCP RST before any answer;
- ``cut``: forward, then send the response head and only half of its body, then RST;
- ``hold``: keep the request waiting until :meth:`FaultProxy.release` (then forward it),
  so a test can stop a client at an exact request and change the world under it.

:meth:`FaultProxy.random_faults` adds a seeded random mode: every request that no rule
claims draws a fault (``slowdown``, ``reset``, ``cut`` by default) with a given
probability, from a ``random.Random(seed)`` of its own (the chaos soak, bench/soak.py).

``down()`` / ``up()`` close and reopen the listening socket on the same port, so the
store looks stopped (connection refused) and then restarted. Counters of requests
seen and faults fired are in :attr:`FaultProxy.stats`; every forwarded request, with
the bytes it sent and received (heads included), is in :attr:`FaultProxy.exchanges`,
which the scale tests count per shard. :attr:`FaultProxy.signers` has, for every request
seen (forwarded or not), the access key id it was signed with (``Credential=AKID/...``
of its SigV4 ``Authorization`` header, or ``X-Amz-Credential`` of a presigned URL; None
when unsigned): which credentials a client really used, since moto accepts any.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import unquote

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
INTERNAL_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)
FAULTS = ("delay", "slowdown", "internal", "reset", "cut", "hold")
RANDOM_FAULTS = ("slowdown", "reset", "cut")
ERROR_ANSWERS = {
    "slowdown": (b"503 Slow Down", SLOWDOWN_BODY),
    "internal": (b"500 Internal Server Error", INTERNAL_BODY),
}


@dataclass(frozen=True)
class Exchange:
    """One forwarded request: what the client sent and what the store answered, in bytes."""

    method: str
    target: str  # path and query, as sent
    sent: int
    received: int
    messages: int = 0  # WebSocket frames the client sent, on an upgraded connection


@dataclass(frozen=True)
class Signed:
    """One request seen, and the access key id that signed it (None: unsigned)."""

    method: str
    target: str
    access_key: str | None


@dataclass
class Rule:
    fault: str
    count: int
    method: str | None = None  # GET, PUT, HEAD, ... or None for any
    path: str = ""  # substring of the request target
    seconds: float = 0.0
    skip: int = 0  # let this many matching requests through first

    def matches(self, method: str, target: str) -> bool:
        return (self.method is None or self.method == method) and self.path in target


class FaultProxy:
    def __init__(self, upstream: str, host: str = "127.0.0.1", port: int = 0) -> None:
        up = upstream.split("://", 1)[-1].rstrip("/")
        uhost, _, uport = up.partition(":")
        self.upstream = (uhost, int(uport or 80))
        self.host = host
        self._lock = threading.Lock()
        self._settled = threading.Condition(self._lock)
        self._active = 0  # connections being served (an exchange not yet recorded)
        self._rules: list[Rule] = []
        self.stats: Counter[str] = Counter()
        self.exchanges: list[Exchange] = []
        self.signers: list[Signed] = []
        self._random: random.Random | None = None
        self._random_rate = 0.0
        self._random_kinds: tuple[str, ...] = RANDOM_FAULTS
        self._released = threading.Event()
        self._holding = 0
        self._listener: socket.socket | None = None
        self._stop = threading.Event()
        self.port = port
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> FaultProxy:
        self._listen()
        return self

    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((self.host, self.port))
        s.listen(128)
        s.settimeout(0.2)
        self.port = s.getsockname()[1]
        self._listener = s
        self._stop.clear()
        self._thread = threading.Thread(target=self._accept_loop, args=(s,), daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening: new connections are refused, as by a stopped server."""
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._listener:
            self._listener.close()
        self._listener = None
        self.stats["outages"] += 1

    def up(self) -> None:
        self._listen()

    def stop(self) -> None:
        if self._listener:
            self.down()

    # -- rules -----------------------------------------------------------------
    def inject(
        self,
        fault: str,
        count: int = 1,
        method: str | None = None,
        path: str = "",
        seconds: float = 0.0,
        skip: int = 0,
    ) -> None:
        if fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}")
        with self._lock:
            if fault == "hold":
                self._released.clear()
            self._rules.append(Rule(fault, count, method, path, seconds, skip))

    def random_faults(self, rate: float, seed: int, kinds: tuple[str, ...] = RANDOM_FAULTS) -> None:
        """From now on, each request no rule claims gets one of ``kinds`` with
        probability ``rate`` (0 turns the mode off). Seeded: the same sequence of
        requests draws the same faults."""
        if not 0 <= rate <= 1 or not set(kinds) <= set(FAULTS) - {"hold", "delay"}:
            raise ValueError(f"rate in [0, 1], kinds among {RANDOM_FAULTS + ('internal',)}")
        with self._lock:
            self._random = random.Random(seed) if rate else None
            self._random_rate = rate
            self._random_kinds = tuple(kinds)

    def held(self) -> int:
        """How many requests a ``hold`` rule keeps waiting now."""
        with self._lock:
            return self._holding

    def release(self) -> None:
        """Let every held request (and any later one a ``hold`` rule matches) go on."""
        self._released.set()

    def access_keys(self) -> Counter[str | None]:
        """Access key id -> requests signed with it, over every request seen."""
        with self._lock:
            return Counter(s.access_key for s in self.signers)

    def clear(self) -> None:
        with self._lock:
            self._rules.clear()
        self._released.set()

    def pending(self) -> int:
        with self._lock:
            return sum(r.count for r in self._rules)

    def _pick(self, method: str, target: str, head: bytes = b"") -> Rule | None:
        with self._lock:
            self.stats["requests"] += 1
            self.stats[f"requests_{method}"] += 1
            self.signers.append(Signed(method, target, access_key_id(head, target)))
            for rule in self._rules:
                if rule.count > 0 and rule.matches(method, target):
                    if rule.skip > 0:
                        rule.skip -= 1
                        continue
                    rule.count -= 1
                    self.stats[f"{rule.fault}_{method}"] += 1
                    self.stats[rule.fault] += 1
                    return rule
            if self._random is not None and self._random.random() < self._random_rate:
                fault = self._random.choice(self._random_kinds)
                self.stats[f"{fault}_{method}"] += 1
                self.stats[fault] += 1
                self.stats["random_faults"] += 1
                return Rule(fault, 0, method, target)
            return None

    # -- serving ---------------------------------------------------------------
    def _accept_loop(self, listener: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def settle(self, timeout: float = 30) -> None:
        """Wait until every connection accepted so far has ended and been recorded (a
        client can have a response's last byte a moment before its exchange is)."""
        with self._settled:
            if not self._settled.wait_for(lambda: self._active == 0, timeout):
                raise TimeoutError(f"{self._active} connection(s) still open after {timeout}s")

    def clear_exchanges(self) -> None:
        """Forget the exchanges recorded so far, once every connection accepted so far
        is recorded: a late record of an earlier exchange cannot land after the clear."""
        self.settle()
        with self._lock:
            self.exchanges.clear()

    def recorded(self) -> list[Exchange]:
        """The exchanges so far, once every connection accepted so far is recorded."""
        self.settle()
        with self._lock:
            return list(self.exchanges)

    def _serve(self, client: socket.socket) -> None:
        with self._lock:
            self._active += 1
        try:
            self._serve_one(client)
        finally:
            with self._settled:
                self._active -= 1
                self._settled.notify_all()

    def _serve_one(self, client: socket.socket) -> None:
        try:
            head, rest = _read_head(client)
            if head is None:
                client.close()
                return
            method, target = _request_line(head)
            rule = self._pick(method, target, head)
            if rule and rule.fault == "delay":
                time.sleep(rule.seconds)
            if rule and rule.fault == "hold":
                with self._lock:
                    self._holding += 1
                try:
                    self._released.wait()
                finally:
                    with self._lock:
                        self._holding -= 1
            if rule and rule.fault == "reset":
                _reset(client)
                return
            expects = _expects_continue(head)
            if rule and rule.fault in ERROR_ANSWERS:
                # Like S3: a client waiting for "100 Continue" gets the error instead
                # and never sends its body; otherwise read the body before answering.
                if not expects:
                    _drain_body(client, head, rest)
                status, body = ERROR_ANSWERS[rule.fault]
                client.sendall(
                    b"HTTP/1.1 "
                    + status
                    + b"\r\nContent-Type: application/xml\r\n"
                    + f"Content-Length: {len(body)}\r\n".encode()
                    + b"Connection: close\r\n\r\n"
                    # An answer to a HEAD has no body (S3 sends the status alone); bytes
                    # after it would be a malformed answer, a different fault.
                    + (b"" if method == "HEAD" else body)
                )
                client.close()
                return
            upstream = socket.create_connection(self.upstream, timeout=30)
            if rule and rule.fault == "cut" and expects:
                # We read the body ourselves below, so we answer the client's
                # "Expect: 100-continue" ourselves and do not pass it upstream.
                client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                head = _drop_header(head, b"expect:")
            upgrade = b"upgrade: websocket" in head.lower()
            # One request per connection, except a WebSocket upgrade, which must keep its
            # "Connection: Upgrade" and then stays open for its frames.
            first = (head if upgrade else _force_close(head)) + rest
            upstream.sendall(first)
            if rule and rule.fault == "cut":
                # The whole request body goes up first, on this thread: a second thread
                # blocked in recv() on the client socket would delay the RST below.
                _forward_body(client, upstream, head, rest)
                self._forward_cut(client, upstream)
                return
            frames = FrameCounter() if upgrade else None
            sent, received = _pipe(client, upstream, frames)
            with self._lock:
                self.exchanges.append(
                    Exchange(
                        method, target, len(first) + sent, received, frames.frames if frames else 0
                    )
                )
        except OSError:
            client.close()

    def _forward_cut(self, client: socket.socket, upstream: socket.socket) -> None:
        """Send the upstream response head and half its body, then reset."""
        head, rest = _read_head(upstream)
        if head is None:
            _reset(client)
            return
        length = _content_length(head)
        body = rest
        while length is not None and len(body) < length:
            chunk = upstream.recv(65536)
            if not chunk:
                break
            body += chunk
        upstream.close()
        if body:
            client.sendall(head + body[: len(body) // 2])
        else:  # nothing to cut in an empty body (a PUT's answer): cut the head instead
            client.sendall(head[: len(head) // 2])
        _reset(client)


_CREDENTIAL = re.compile(r"Credential=([^/,\s]+)/")
_QUERY_CREDENTIAL = re.compile(r"[?&]X-Amz-Credential=([^&]+)")


def access_key_id(head: bytes, target: str) -> str | None:
    """The access key id a request was signed with: SigV4's ``Authorization:
    AWS4-HMAC-SHA256 Credential=AKID/date/region/s3/aws4_request, ...``, SigV2's
    ``Authorization: AWS AKID:signature``, or a presigned URL's ``X-Amz-Credential``."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"authorization":
            text = value.strip().decode("latin-1")
            found = _CREDENTIAL.search(text)
            if found:
                return found.group(1)
            if text.startswith("AWS "):
                return text[4:].split(":", 1)[0]
            return None
    found = _QUERY_CREDENTIAL.search(target)
    return unquote(found.group(1)).split("/", 1)[0] if found else None


def _read_head(sock: socket.socket) -> tuple[bytes | None, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return None, b""
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


def _request_line(head: bytes) -> tuple[str, str]:
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    return parts[0].upper(), parts[1] if len(parts) > 1 else ""


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


def _expects_continue(head: bytes) -> bool:
    return any(
        ln.lower().startswith(b"expect:") and b"100-continue" in ln.lower()
        for ln in head.split(b"\r\n")
    )


def _drop_header(head: bytes, prefix: bytes) -> bytes:
    lines = [ln for ln in head.rstrip(b"\r\n").split(b"\r\n") if not ln.lower().startswith(prefix)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _force_close(head: bytes) -> bytes:
    lines = [
        ln
        for ln in head.rstrip(b"\r\n").split(b"\r\n")
        if not ln.lower().startswith((b"connection:", b"keep-alive:"))
    ]
    return b"\r\n".join([*lines, b"Connection: close"]) + b"\r\n\r\n"


def _drain_body(sock: socket.socket, head: bytes, rest: bytes) -> None:
    length = _content_length(head) or 0
    got = len(rest)
    sock.settimeout(5)
    while got < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        got += len(chunk)


def _forward_body(src: socket.socket, dst: socket.socket, head: bytes, rest: bytes) -> None:
    remaining = (_content_length(head) or 0) - len(rest)
    while remaining > 0:
        chunk = src.recv(min(65536, remaining))
        if not chunk:
            break
        dst.sendall(chunk)
        remaining -= len(chunk)


def _reset(sock: socket.socket) -> None:
    # SO_LINGER with a zero timeout makes close() send RST instead of FIN.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FrameCounter:
    """Counts the WebSocket frames in a client's byte stream (RFC 6455 framing)."""

    def __init__(self) -> None:
        self.frames = 0
        self._buf = b""
        self._skip = 0  # payload bytes of the current frame still to pass

    def feed(self, data: bytes) -> None:
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            data = data[taken:]
        self._buf += data
        while len(self._buf) >= 2:
            length = self._buf[1] & 0x7F
            masked = self._buf[1] & 0x80
            head = 2 + {126: 2, 127: 8}.get(length, 0) + (4 if masked else 0)
            if len(self._buf) < head:
                return
            if length == 126:
                length = int.from_bytes(self._buf[2:4], "big")
            elif length == 127:
                length = int.from_bytes(self._buf[2:10], "big")
            self.frames += 1
            rest = self._buf[head:]
            if len(rest) >= length:
                self._buf = rest[length:]
            else:
                self._skip, self._buf = length - len(rest), b""
                return


def _copy(
    src: socket.socket, dst: socket.socket, counted: list[int], frames: FrameCounter | None = None
) -> None:
    try:
        while True:
            chunk = src.recv(65536)
            if not chunk:
                break
            dst.sendall(chunk)
            counted[0] += len(chunk)
            if frames is not None:  # the request head went up already: frames follow
                frames.feed(chunk)
    except OSError:
        pass
    finally:
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_WR)


def _pipe(
    client: socket.socket, upstream: socket.socket, frames: FrameCounter | None = None
) -> tuple[int, int]:
    """Forward both ways until both close; (bytes sent up, bytes received) after the head."""
    up, down = [0], [0]
    t = threading.Thread(target=_copy, args=(client, upstream, up, frames), daemon=True)
    t.start()
    _copy(upstream, client, down)
    if frames is None:
        # One request per connection: the answer is whole, so the request was too; stop
        # waiting on a client that keeps its socket open after reading it.
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RD)
    t.join(timeout=30)
    client.close()
    upstream.close()
    return up[0], down[0]
