"""Deterministic fault points, switched on by environment variables (tests and drills).

Production code calls these hooks at the instants that matter for exactly-once
output; with the variables unset each hook is one dict lookup and does nothing.

- ``CLIPBATCH_CRASH_AT=point[:shard]`` SIGKILLs this process at ``point`` (one of
  :data:`CRASH_POINTS`), optionally only for shard ``shard`` (for the ``knn_`` points: the index name). SIGKILL, not an
  exception, so no ``finally`` or ``atexit`` runs: the same as a lost machine.
- ``CLIPBATCH_FAULT_OOM_ABOVE=N`` makes every model forward pass over more than N
  rows raise :class:`torch.OutOfMemoryError`, as a GPU would, so the OOM back-off can
  be exercised on a CPU.
"""

from __future__ import annotations

import logging
import os
import signal

from clipbatch.upgrade.names import crash_point_name

log = logging.getLogger(__name__)

CRASH_ENV = "CLIPBATCH_CRASH_AT"
OOM_ENV = "CLIPBATCH_FAULT_OOM_ABOVE"

CRASH_POINTS = (
    "before_staging",  # local file complete, nothing uploaded yet
    "after_staging",  # staged file uploaded and verified, not moved
    "mid_move",  # final key written, staged copy not yet deleted (object stores)
    "before_index",  # shard committed, its commit record not written yet
    "knn_mid_stage",  # a kNN build's index file staged, its id map and lineage not yet
    "knn_before_pointer",  # a kNN build staged and verified, CURRENT.json not yet switched
    "judge_before_index",  # a table's judgements written, its _index.json not yet
    "curate_mid_write",  # a curated shard staged, the rest of the run's not yet
    "curate_before_commit",  # every shard staged, the selection's state.json not written
    "curate_before_publish",  # state.json committed, the staged shards not yet published
)


def crash_point(point: str, shard: str) -> None:
    """SIGKILL this process if ``CLIPBATCH_CRASH_AT`` selects ``point`` (and ``shard``)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    want, _, want_shard = spec.partition(":")
    want = crash_point_name(want)
    if want not in CRASH_POINTS:
        raise ValueError(f"{CRASH_ENV}={spec!r}: point must be one of {CRASH_POINTS}")
    if want == point and (not want_shard or want_shard == shard):
        log.warning("fault injection: SIGKILL at %s of shard %s", point, shard)
        os.kill(os.getpid(), signal.SIGKILL)


def before_forward(rows: int) -> None:
    """Raise a real :class:`torch.OutOfMemoryError` if ``rows`` exceeds the injected limit."""
    limit = os.environ.get(OOM_ENV)
    if limit and rows > int(limit):
        import torch

        raise torch.OutOfMemoryError(
            f"CUDA out of memory (injected by {OOM_ENV}={limit}: batch of {rows} rows)"
        )
