"""Test helpers: read tables back, and compute reference embeddings with stock clip calls."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import EmbedConfig, StorageOptions, build_config
from clipbatch.io.storage import get_fs


def read_table(dest: str, endpoint: str | None = None) -> tuple[pa.Table, list[str]]:
    """All shard files under ``dest`` (not bookkeeping), concatenated; and their names."""
    fs, path = get_fs(dest, StorageOptions(endpoint_url=endpoint))
    files = sorted(
        p
        for p in fs.ls(path, detail=False)
        if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith("_")
    )
    tables = [pq.read_table(p, filesystem=fs) for p in files]
    return pa.concat_tables(tables), [p.rsplit("/", 1)[-1] for p in files]


def tar_samples(paths: list[Path]) -> dict[str, dict[str, bytes]]:
    """key -> {ext: bytes} for every member of the given tars."""
    out: dict[str, dict[str, bytes]] = {}
    for p in paths:
        with tarfile.open(p) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def reference_embeddings(
    model, preprocess, image_bytes: bytes, caption: str
) -> tuple[np.ndarray, np.ndarray]:
    """Stock clip: model.encode_image(preprocess(img)), model.encode_text(clip.tokenize(caption))."""
    import clip
    import torch
    from PIL import Image

    with torch.no_grad():
        img = preprocess(Image.open(io.BytesIO(image_bytes))).unsqueeze(0)
        i = model.encode_image(img).float().numpy()[0]
        t = model.encode_text(clip.tokenize([caption], truncate=True)).float().numpy()[0]
    return i / np.linalg.norm(i), t / np.linalg.norm(t)


def no_vector(vector: object) -> bool:
    """A row without a vector: null (tables before zero vectors) or all zeros (since)."""
    return vector is None or not np.any(np.asarray(vector, np.float32))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def tiny_s3_config(
    source: str | dict,
    dest: str,
    endpoint: str,
    *,
    sink: dict | None = None,
    storage_extra: dict | None = None,
    **runtime: object,
) -> EmbedConfig:
    """The tiny model on the CPU, source and sink on the S3 ``endpoint``.

    ``source`` is a URL or a SourceConfig mapping; ``runtime`` overrides the defaults
    below (a small batch, no task retries unless a test asks for them).
    """
    storage = {"endpoint_url": endpoint, "extra": storage_extra or {}}
    source_options = {"url": source} if isinstance(source, str) else dict(source)
    return build_config(
        {
            "source": {**source_options, "storage": storage},
            "sink": {"url": dest, "storage": storage, **(sink or {})},
            "model": {"name": "tiny"},
            "runtime": {"device": "cpu", "batch_size": 8, "task_retries": 0, **runtime},
        }
    )
