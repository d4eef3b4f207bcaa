"""``{dest}/_manifest.json``: the commit index of tables written before ``_commits/`` (v1).

Written by clipbatch up to commit af75f36 (0.1.0 before the commit index). A table that
still has one is read as if its entries were commit records, and the first compaction
folds them into a snapshot and deletes the file (:mod:`clipbatch.sink.commits.compact`).
May go once no supported table can still hold one: after 0.3.
"""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger(__name__)

LEGACY_MANIFEST = "_manifest.json"
LOCK_SUFFIX = ".lock"  # the old writer's flock file beside it, never removed by that code


def shard_entries(raw: bytes, where: str) -> dict[str, dict[str, Any]]:
    """shard -> the commit-record fields (all but ``shard`` and ``file_version``) of every
    usable entry; an unreadable manifest is an empty one, with a warning."""
    try:
        data = json.loads(raw)
    except ValueError as e:
        log.warning("ignoring unreadable %s: %s", where, e)
        return {}
    shards = data.get("shards") if isinstance(data, dict) else None
    out: dict[str, dict[str, Any]] = {}
    for shard, e in (shards if isinstance(shards, dict) else {}).items():
        if not isinstance(e, dict) or not e.get("fingerprint"):
            continue
        out[shard] = {
            "file": e.get("file") or f"{shard}.parquet",
            "fingerprint": str(e["fingerprint"]),
            "rows": int(e.get("rows") or 0),
            "counts": dict(e.get("counts") or {}),
            "sha256": e.get("sha256"),
            "source_uri": e.get("source_uri"),
            "source_version": e.get("source_version"),
            "run_id": e.get("run_id"),
        }
    return out
