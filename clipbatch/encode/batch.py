"""One decoded batch through the model: embeddings, normalised, as rows ready to write."""

from __future__ import annotations

import numpy as np

from clipbatch.encode.encoder import ClipEncoder, is_oom, l2_normalize
from clipbatch.preprocess.batches import DecodedBatch, has_text
from clipbatch.records import ENCODE_ERROR, OK, RowBlock
from clipbatch.skiplog import SkipLogger


def encode_batch(
    decoded: DecodedBatch, encoder: ClipEncoder, normalize: bool, skips: SkipLogger
) -> RowBlock:
    """Image and text embeddings of a batch. A batch the model rejects keeps its rows, as
    ``encode_error``; an out-of-memory error is raised (the encoder has already halved its
    batch size and retried down to 1)."""
    rows = decoded.rows
    n = len(rows)
    has_image = np.array([r.pixels is not None for r in rows], dtype=bool)
    has_caption = np.array([has_text(r) for r in rows], dtype=bool)
    dim = encoder.loaded.embed_dim
    img = np.full((n, dim), np.nan, np.float32) if has_image.any() else None
    txt = np.full((n, dim), np.nan, np.float32) if has_caption.any() else None
    truncated = [False] * n
    try:
        if img is not None and decoded.pixels is not None:
            img[has_image] = encoder.encode_images(decoded.pixels)
        if txt is not None and decoded.tokens is not None:
            txt[has_caption] = encoder.encode_tokens(decoded.tokens)
            for i, flag in zip(np.flatnonzero(has_caption), decoded.truncated, strict=True):
                truncated[i] = flag
    except Exception as e:
        if is_oom(e):
            raise
        for r in rows:
            if r.raw.status == OK:
                r.raw.status, r.raw.error = ENCODE_ERROR, f"{type(e).__name__}: {e}"
        has_image[:] = False
        has_caption[:] = False
        img = txt = None
    if normalize:
        img = l2_normalize(img) if img is not None else None
        txt = l2_normalize(txt) if txt is not None else None
    for r in rows:
        if r.raw.status != OK:
            skips.record(r.raw.key, r.raw.status, r.raw.error)
    return RowBlock(rows, img, txt, has_image, has_caption, truncated)
