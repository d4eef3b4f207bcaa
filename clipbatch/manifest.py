"""``{dest}/_manifest.json``: the dataset index, updated last and atomically.

It maps each committed shard to its fingerprint, counts and checksum. Shard files
are the truth: the manifest is an index over them, so a crash between moving a
file and updating the manifest is repaired by the next run, which reads the file's
own footer (see :func:`clipbatch.plan.plan_shards`).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from clipbatch.config import SinkConfig
from clipbatch.storage import get_fs, join, read_bytes, write_bytes_atomic

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 1


def manifest_uri(dest: str) -> str:
    return join(dest, MANIFEST_NAME)


def read_manifest(sink: SinkConfig) -> dict[str, Any]:
    fs, path = get_fs(manifest_uri(sink.url), sink.storage)
    try:
        data = json.loads(read_bytes(fs, path))
    except FileNotFoundError:
        return {"version": MANIFEST_VERSION, "shards": {}}
    except ValueError as e:
        # Written atomically, so this means someone edited it by hand; shard footers
        # still hold the truth and the next update rewrites it.
        log.warning("ignoring unreadable %s: %s", path, e)
        return {"version": MANIFEST_VERSION, "shards": {}}
    data.setdefault("shards", {})
    return data


def update_manifest(sink: SinkConfig, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Merge ``entries`` (shard name -> record) into the manifest and write it atomically."""
    fs, path = get_fs(manifest_uri(sink.url), sink.storage)
    data = read_manifest(sink)
    data["shards"].update(entries)
    data["version"] = MANIFEST_VERSION
    data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    body = json.dumps(data, indent=1, sort_keys=True).encode()
    write_bytes_atomic(fs, path, body)
    return data
