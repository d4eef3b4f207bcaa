"""Secret redaction for everything lineage writes: run records, events, artifacts.

Three layers, because a secret can hide in a key, in a URL or inside free text such
as an exception message:

- mapping keys that look like credentials have their values replaced; names of
  references (a Prefect block's name, ``credentials_block``) are not secrets: the block
  holds the secret, its name says where it is, and lineage must be able to say which
  block a run used (a trigger's parameters need it too);
- URLs lose their password (``user:pass@``) and signed-query parameters;
- any string containing the value of a credential-looking environment variable has
  that value masked, wherever it appears.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"

# A name is a credential's when one of its segments (split on _ - .) is one of these, or it contains one of the compounds: so
# AWS_SECRET_ACCESS_KEY and OPENLINEAGE__TRANSPORT__AUTH match, max_caption_tokens not.
_SECRET_SEGMENTS = {
    "secret",
    "secrets",
    "password",
    "passwd",
    "pwd",
    "token",
    "credential",
    "credentials",
    "apikey",
    "signature",
    "sig",
    "sas",
    "auth",
    "authorization",
}
# Whole names only: "key" alone is s3fs's access key id, but key_column is not secret.
_SECRET_EXACT = {"key"}
_SECRET_COMPOUNDS = ("api_key", "access_key", "private_key", "account_key", "session_key")
# Names that refer to where a secret is kept, never the secret: kept as they are.
_REFERENCE_SUFFIXES = ("_block", "_block_name")
# Query parameters of presigned / SAS URLs.
_SECRET_QUERY = re.compile(r"(signature|credential|token|sig|key|secret|se?ssion)", re.IGNORECASE)
_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")
# Values shorter than this are not scrubbed from free text: "true" or "1" in an env
# var named *_TOKEN_REFRESH would otherwise mask every "1" in a record.
_MIN_SECRET_LEN = 8


def is_secret_name(name: str) -> bool:
    """Whether a mapping key names a secret value (``aws_secret_access_key``, ``token``),
    not a reference to one (``credentials_block``)."""
    low = name.lower().replace("-", "_")
    if low.endswith(_REFERENCE_SUFFIXES):
        return False
    segments = set(re.split(r"[_.]+", low))
    return (
        low in _SECRET_EXACT
        or bool(segments & _SECRET_SEGMENTS)
        or any(c in low for c in _SECRET_COMPOUNDS)
    )


def secret_values(environ: Mapping[str, str] | None = None) -> set[str]:
    """Values of environment variables whose names look like credentials."""
    env = os.environ if environ is None else environ
    return {v for k, v in env.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN}


def redact_url(url: str) -> str:
    """Drop the password and signed-query parameters of a URL; other text passes through."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        netloc = f"{MASK if is_secret_name(user) or ':' in userinfo else user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class Redactor:
    """Redacts nested JSON-like values; built once per run with the secrets to mask."""

    def __init__(self, extra_secrets: Iterable[str] = (), environ: Mapping[str, str] | None = None):
        values = secret_values(environ) | {s for s in extra_secrets if len(s) >= _MIN_SECRET_LEN}
        # Longest first, so a secret that contains another is masked whole.
        self.values = sorted(values, key=len, reverse=True)

    def text(self, value: str) -> str:
        out = _URL.sub(lambda m: redact_url(m.group(0)), value)
        for secret in self.values:
            if secret in out:
                out = out.replace(secret, MASK)
        return out

    def __call__(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {
                k: (MASK if isinstance(k, str) and is_secret_name(k) and v else self(v))
                for k, v in value.items()
            }
        if isinstance(value, (list, tuple)):
            return [self(v) for v in value]
        return value


def redact(value: Any, environ: Mapping[str, str] | None = None) -> Any:
    """One-shot redaction with the current environment's secrets."""
    return Redactor(environ=environ)(value)
