"""One job per table root at a time: a global concurrency limit per root and job.

The kNN build (``clipbatch-index-…``) and the judgements (``clipbatch-judge-…``: scores,
SemDeDup and curation, which read and write the same ``_scores/`` files) each hold a
slot of their root's limit (1 slot, created on first use) for the whole job, so a
backfill's many completions queue one after another instead of racing on one root's
bookkeeping.
"""

from __future__ import annotations

import contextlib
import hashlib
import re

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound


def root_limit_name(root: str, job: str = "index") -> str:
    """The global concurrency limit of one root and job: readable, and unique per root."""
    tail = re.sub(r"[^A-Za-z0-9_.-]+", "-", root.rstrip("/").rsplit("/", 1)[-1])[:40]
    digest = hashlib.sha256(root.rstrip("/").encode()).hexdigest()[:12]
    return f"clipbatch-{job}-{tail}-{digest}"


def ensure_root_limit(name: str) -> None:
    """Create the root's limit (1 slot) unless it exists; a concurrent creator wins.

    Read first: a create that loses the race is answered 409, but the server logs the
    conflict as an error, and every job after the first would add one to its log.
    """
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                limit = GlobalConcurrencyLimitCreate(name=name, limit=1)
                client.create_global_concurrency_limit(limit)
