"""How ``clipbatch serve`` runs: safe by default.

- It binds 127.0.0.1. Any other address needs a bearer token (``--token`` or
  ``CLIPBATCH_SERVE_TOKEN``); without one it refuses to start.
- It only reads tables; a key that is not in the table is a 404, and nothing in a
  request becomes a path (keys are looked up in the rows the server loaded).
- Bodies and images are bounded (``max_body_bytes``, ``max_image_pixels``); CORS is off
  unless origins are named.
- Image URLs of a table's rows reach the public internet and ``allow_networks`` only:
  the server's own, never the one the table recorded.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field

from clipbatch.config import StorageOptions
from clipbatch.errors import ConfigError

TOKEN_VARIABLE = "CLIPBATCH_SERVE_TOKEN"


@dataclass(frozen=True)
class ServeSettings:
    root: str
    storage: StorageOptions = field(default_factory=StorageOptions)
    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    device: str = "cpu"
    use_index: bool = True
    allow_networks: tuple[str, ...] = ()
    max_body_bytes: int = 32 << 20
    max_image_pixels: int = 50_000_000
    max_batch: int = 64  # items per forward pass (dynamic batching)
    max_wait_ms: float = 5.0  # how long a request waits for others to share its pass
    max_texts: int = 1024  # per request
    cors_origins: tuple[str, ...] = ()
    thumbnail_cache_bytes: int = 64 << 20

    @classmethod
    def from_environment(cls, root: str, **kwargs: object) -> ServeSettings:
        """Settings, with the token from ``CLIPBATCH_SERVE_TOKEN`` when none is given."""
        token = kwargs.pop("token", None) or os.environ.get(TOKEN_VARIABLE) or None
        return cls(root=root, token=token, **kwargs)  # type: ignore[arg-type]

    def check(self) -> None:
        """Refuse what is unsafe: another address than loopback without a token."""
        if not is_loopback(self.host) and not self.token:
            raise ConfigError(
                f"serving on {self.host} reaches other machines: give a bearer token with "
                f"--token or {TOKEN_VARIABLE} (clients send 'Authorization: Bearer <token>'), "
                "or bind 127.0.0.1"
            )
        if self.max_batch < 1 or self.max_wait_ms < 0:
            raise ConfigError("max_batch must be at least 1 and max_wait_ms at least 0")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
