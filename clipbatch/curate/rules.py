"""A spec's rules over one shard file's rows: keep or drop, and every reason to drop.

Each reason reads ``kind: detail``; the kind is what the report counts by::

    status: decode_error
    similarity: 0.213 < 0.28
    aesthetic-laion-v2: 4.12 < 5
    nsfw-laion-l14: no score            (the row has no vector)
    duplicate: of date=2026-11-01/000000013
    image: the source changed since the table was written   (found while copying)

Duplicates follow SemDeDup's groups, which are stable night after night: a group is
represented by its earliest row (rank 0), so a later member is dropped as a duplicate,
tonight and on every night after, whatever happened to the earliest row (as NeMo
Curator, deduplication comes before the other filters: a near-copy never slips in
because its original was dropped for its caption).

Example::

    keep, reasons = evaluate(spec.rules, rows)   # rows: RowJudgements of one file
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from clipbatch.curate.spec import Rules
from clipbatch.records import OK


@dataclass
class RowJudgements:
    """One shard file's rows, as the rules read them."""

    status: np.ndarray  # object
    similarity: np.ndarray  # float32, NaN where there is none
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # float32, NaN: none
    group: np.ndarray | None = None  # object: the group's earliest row, or None
    rank: np.ndarray | None = None  # int32, -1: in no group (no vector)

    def __len__(self) -> int:
        return len(self.status)


def evaluate(rules: Rules, rows: RowJudgements) -> tuple[np.ndarray, list[list[str]]]:
    """(keep mask, reasons per row): a row is kept when it has no reason to be dropped."""
    n = len(rows)
    reasons: list[list[str]] = [[] for _ in range(n)]
    if rules.status_ok:
        for i in np.flatnonzero(rows.status != OK):
            reasons[i].append(f"status: {rows.status[i]}")
    if rules.min_similarity is not None:
        low = _below(rows.similarity, rules.min_similarity)
        for i in np.flatnonzero(low):
            v = rows.similarity[i]
            detail = "no similarity" if np.isnan(v) else f"{v:.3f} < {rules.min_similarity:g}"
            reasons[i].append(f"similarity: {detail}")
    for name, rule in sorted(rules.scores.items()):
        values = rows.scores[name]
        for i in np.flatnonzero(np.isnan(values)):
            reasons[i].append(f"{name}: no score")
        if rule.min is not None:
            for i in np.flatnonzero(~np.isnan(values) & (values < rule.min)):
                reasons[i].append(f"{name}: {values[i]:.4g} < {rule.min:g}")
        if rule.max is not None:
            for i in np.flatnonzero(~np.isnan(values) & (values > rule.max)):
                reasons[i].append(f"{name}: {values[i]:.4g} > {rule.max:g}")
    if rules.unique is not None and rows.rank is not None and rows.group is not None:
        for i in np.flatnonzero(rows.rank > 0):
            reasons[i].append(f"duplicate: of {rows.group[i]}")
    keep = np.array([not r for r in reasons], bool)
    return keep, reasons


def reason_kind(reason: str) -> str:
    """``"aesthetic-laion-v2: 4.12 < 5"`` -> ``"aesthetic-laion-v2"``."""
    return reason.split(":", 1)[0]


def _below(values: np.ndarray, bound: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.isnan(values) | (values < bound)
