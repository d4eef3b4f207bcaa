"""Retrieval and zero-shot metrics over L2-normalised embedding matrices.

Shared by the training script (held-out figures in the sidecar) and the quality tests,
which compute them from a Parquet output table alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def recall_at_1(queries: np.ndarray, gallery: np.ndarray, captions: Sequence[str]) -> float:
    """Share of rows whose nearest gallery item is their own row.

    A hit also counts when the nearest item has the identical caption: two scenes with
    the same description are indistinguishable from the text, so neither is "wrong".
    """
    sims = np.asarray(queries, np.float32) @ np.asarray(gallery, np.float32).T
    best = sims.argmax(axis=1)
    hits = [best[i] == i or captions[best[i]] == captions[i] for i in range(len(captions))]
    return float(np.mean(hits)) if hits else 0.0


def zero_shot_accuracy(
    image_emb: np.ndarray, class_emb: np.ndarray, labels: Sequence[int]
) -> float:
    """Share of images whose most similar class prompt is their own label."""
    pred = (np.asarray(image_emb, np.float32) @ np.asarray(class_emb, np.float32).T).argmax(1)
    return float(np.mean(pred == np.asarray(labels))) if len(labels) else 0.0
