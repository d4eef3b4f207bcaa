"""OpenLineage dataset naming from URLs: namespace = scheme + bucket, name = the path.

This follows the OpenLineage naming conventions for object stores
(``s3://bucket`` + ``path/to/object``) and local files (``file`` + absolute path).
"""

from __future__ import annotations

import os
import re

from clipbatch.lineage.redact import redact_url

_PATTERN = re.compile(r"[*?\[{]")


def dataset_id(url: str) -> tuple[str, str]:
    """(namespace, name) for a dataset URL; credentials never reach the namespace."""
    url = redact_url(url)
    if "://" not in url or url.startswith("file://"):
        path = url[len("file://") :] if url.startswith("file://") else url
        return "file", os.path.abspath(path).rstrip("/") or "/"
    scheme, rest = url.split("://", 1)
    scheme = scheme.lower()
    if scheme in ("s3a", "s3n"):
        scheme = "s3"
    bucket, _, path = rest.partition("/")
    if scheme in ("http", "https"):
        return f"{scheme}://{bucket}", "/" + path.split("?", 1)[0].rstrip("/")
    return f"{scheme}://{bucket}", path.rstrip("/") or "/"


def dataset_prefix(url: str) -> str:
    """The folder a pattern URL (glob or brace) selects from: the dataset's identity."""
    match = _PATTERN.search(url)
    if not match:
        return url.rstrip("/")
    head = url[: match.start()]
    return head.rsplit("/", 1)[0] if "/" in head else head
