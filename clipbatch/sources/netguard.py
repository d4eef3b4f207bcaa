"""Which addresses an image URL may reach: the public internet, and networks the user names.

A table of URLs crawled from the internet is untrusted input. Without a guard, a row
pointing at ``http://169.254.169.254/latest/meta-data/...`` (a cloud's instance metadata,
credentials included), ``http://localhost:8080/`` or ``http://10.0.0.5/`` would make a
worker fetch from inside its own network. So every connection the fetcher opens, the
first and every redirect hop, is checked on the address it actually connects to (after
DNS, so a name that resolves to a private address is caught too):

- allowed: global (public) unicast addresses, and any network in ``allow_networks``;
- refused by default: loopback, link-local (169.254.0.0/16, fe80::/10, the metadata
  endpoints 169.254.169.254 and fd00:ec2::254), private (RFC 1918, fc00::/7), shared
  (100.64.0.0/10), multicast, reserved and unspecified addresses, and IPv4 addresses
  wrapped in IPv6 (``::ffff:10.0.0.1``, NAT64) whose IPv4 address is one of those.

A refused row gets the status ``blocked_url`` (an image problem: the text vector is
kept), with the address and what to set to allow it. HTTP proxies from the environment
are not used for image URLs: the guard must see the address it connects to.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class BlockedAddressError(OSError):
    """A URL's host resolves only to addresses the fetcher may not reach."""


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """CIDR strings (``10.0.0.0/8``, ``127.0.0.1``, ``::1/128``) as networks; ValueError if bad."""
    return tuple(ipaddress.ip_network(v.strip(), strict=False) for v in values)


def _unwrap(address: Address) -> Address:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _kind(address: Address) -> str:
    for test, name in (
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local (cloud metadata lives here)"),
        ("is_multicast", "multicast"),
        ("is_unspecified", "unspecified"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(address, test):
            return name
    return "not globally routable"


@dataclass(frozen=True)
class AddressPolicy:
    """The networks a fetch may reach beyond the public internet."""

    allowed: tuple[Network, ...] = ()

    @classmethod
    def of(cls, allow_networks: Iterable[str]) -> AddressPolicy:
        return cls(parse_networks(allow_networks))

    def refusal(self, address: str) -> str | None:
        """Why ``address`` may not be reached, or None when it may."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
        if any(ip in net for net in self.allowed):
            return None
        inner = _unwrap(ip)
        if inner is not ip and any(inner in net for net in self.allowed):
            return None
        if inner.is_global and not inner.is_multicast:
            return None
        return f"{address} is {_kind(inner)}"


def guarded_create_connection(policy: AddressPolicy) -> Callable[..., socket.socket]:
    """A drop-in for :func:`socket.create_connection` that connects only where ``policy``
    allows, to an address it checked itself (no second DNS lookup to race with)."""

    def create_connection(
        address: tuple[str, int],
        timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
        source_address: tuple[str, int] | None = None,
        **_: Any,
    ) -> socket.socket:
        host, port = address
        refused: list[str] = []
        error: OSError | None = None
        for family, type_, proto, _canon, sockaddr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM
        ):
            reason = policy.refusal(str(sockaddr[0]))
            if reason is not None:
                refused.append(reason)
                continue
            sock = socket.socket(family, type_, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                    sock.settimeout(timeout)
                if source_address:
                    sock.bind(source_address)
                sock.connect(sockaddr)
                return sock
            except OSError as e:
                sock.close()
                error = e
        if error is not None:
            raise error
        raise BlockedAddressError(
            f"{host} resolves to {'; '.join(dict.fromkeys(refused))}: refused "
            "(set source.allow_networks to allow such a network)"
        )

    return create_connection


def _connection_class(base: type[http.client.HTTPConnection], policy: AddressPolicy) -> type:
    class Guarded(base):  # type: ignore[valid-type, misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = guarded_create_connection(policy)

    return Guarded


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__()
        self._conn = _connection_class(http.client.HTTPConnection, policy)

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(self._conn, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: AddressPolicy) -> None:
        super().__init__()
        self._conn = _connection_class(http.client.HTTPSConnection, policy)

    def https_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(self._conn, req)


def guarded_opener(policy: AddressPolicy) -> urllib.request.OpenerDirector:
    """An opener for http(s) only, following redirects, every hop checked; no proxies,
    no file:// or ftp:// (a redirect there is an error)."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        _HTTPHandler(policy),
        _HTTPSHandler(policy),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
        urllib.request.UnknownHandler(),
    ):
        opener.add_handler(handler)
    return opener
