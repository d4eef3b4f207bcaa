"""Prefect asset keys of clipbatch's tables and indexes."""

from __future__ import annotations

import os


def asset_key(url: str) -> str:
    """Prefect asset keys are URIs: local paths become file:// URIs."""
    if "://" in url:
        return url.rstrip("/")
    return "file://" + os.path.abspath(url).rstrip("/")
