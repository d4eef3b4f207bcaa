"""One shard, end to end: read -> decode/preprocess -> encode -> write -> commit.

Stages overlap: a reader thread streams rows into a bounded queue, a thread pool
decodes the next batch while the model encodes the current one, and memory is
bounded by the queue sizes, not by the shard or dataset size.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipbatch import __version__
from clipbatch.config import EmbedConfig
from clipbatch.decode import DecodeOptions, prepare
from clipbatch.encode import CLIP_MEAN, CLIP_STD, ClipEncoder, is_oom, l2_normalize
from clipbatch.errors import TooManyErrorsError
from clipbatch.fingerprint import output_options
from clipbatch.logutil import SkipLogger
from clipbatch.model import LoadedModel
from clipbatch.records import (
    ENCODE_ERROR,
    OK,
    PreparedSample,
    RawSample,
    ShardResult,
    ShardSpec,
    StageTimings,
)
from clipbatch.sink import RowBlock, ShardWriter
from clipbatch.sources.base import ShardReader
from clipbatch.table import SCHEMA_VERSION

log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]
_END = object()


@dataclass
class ShardContext:
    """What a shard run needs besides the shard: built once per process and reused."""

    config: EmbedConfig
    reader: ShardReader
    loaded: LoadedModel
    encoder: ClipEncoder
    run_id: str
    run_meta: dict[str, Any] = field(default_factory=dict)  # flow run ids etc., for file metadata
    progress: ProgressFn | None = None


def decode_workers(config: EmbedConfig) -> int:
    return config.runtime.decode_workers or max(1, os.cpu_count() or 1)


def _read_ahead(
    reader: ShardReader,
    shard: ShardSpec,
    out: queue.Queue,
    timings: StageTimings,
    stop: threading.Event,
) -> None:
    """Reader thread: stream rows into ``out``; exceptions are passed through the queue."""
    try:
        it = iter(reader.read(shard))
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                row = next(it)
            except StopIteration:
                break
            timings.read += time.perf_counter() - t0
            while not stop.is_set():
                try:
                    out.put(row, timeout=0.1)
                    break
                except queue.Full:
                    continue
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
        out.put(e)
        return
    out.put(_END)


def _batches(q: queue.Queue, size: int) -> Iterator[list[RawSample]]:
    batch: list[RawSample] = []
    while True:
        item = q.get()
        if item is _END:
            break
        if isinstance(item, BaseException):
            raise item
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def process_shard(shard: ShardSpec, ctx: ShardContext, fingerprint: str) -> ShardResult:
    """Encode and commit one shard. Raises :class:`TooManyErrorsError` after committing."""
    cfg = ctx.config
    start = time.perf_counter()
    timings = StageTimings()
    opts = DecodeOptions(
        n_px=ctx.loaded.input_resolution,
        mode=cfg.runtime.preprocess,
        max_pixels=cfg.runtime.max_image_pixels,
    )
    writer = ShardWriter(
        cfg.sink,
        shard.name,
        ctx.run_id,
        ctx.loaded.embed_dim,
        ctx.reader.passthrough_fields(shard),
        shard.uri,
        shard.version,
    )
    skips = SkipLogger(log, shard.name)
    batch_size = ctx.encoder.batch_size
    rows_q: queue.Queue = queue.Queue(maxsize=4 * batch_size)
    stop = threading.Event()
    reader_thread = threading.Thread(
        target=_read_ahead,
        args=(ctx.reader, shard, rows_q, timings, stop),
        name=f"read-{shard.name}",
        daemon=True,
    )
    pool = ThreadPoolExecutor(
        max_workers=decode_workers(cfg), thread_name_prefix=f"decode-{shard.name}"
    )
    reader_thread.start()
    try:
        pending: _DecodedBatch | None = None
        for raw_batch in _batches(rows_q, batch_size):
            submitted = _submit_decode(pool, raw_batch, opts)
            if pending is not None:
                _encode_and_write(pending.result(), ctx, writer, timings, skips)
            pending = submitted
        if pending is not None:
            _encode_and_write(pending.result(), ctx, writer, timings, skips)
        t0 = time.perf_counter()
        meta = file_metadata(shard, ctx)
        final_uri, sha = writer.close_and_commit(meta, fingerprint)
        timings.write += time.perf_counter() - t0
    except BaseException:
        stop.set()
        writer.abort()
        raise
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        reader_thread.join(timeout=5)
    skips.summary()
    result = ShardResult(
        shard=shard.name,
        output_uri=final_uri,
        status="committed",
        rows=writer.rows,
        counts=dict(writer.counts),
        seconds=time.perf_counter() - start,
        timings=timings,
        fingerprint=fingerprint,
        source_uri=shard.uri,
        source_version=shard.version,
        sha256=sha,
    )
    failed = result.failed_rows
    if result.rows and failed / result.rows > cfg.runtime.max_error_ratio:
        raise TooManyErrorsError(shard.name, failed, result.rows, cfg.runtime.max_error_ratio)
    return result


@dataclass
class _Decoded:
    rows: list[PreparedSample]
    seconds: float  # decode time summed over the decode threads


class _DecodedBatch:
    """A batch whose images decode on the pool while the previous batch encodes."""

    def __init__(
        self, pool: ThreadPoolExecutor, batch: list[RawSample], opts: DecodeOptions
    ) -> None:
        self._futures: list[Future] = [pool.submit(_timed_prepare, r, opts) for r in batch]

    def result(self) -> _Decoded:
        done = [f.result() for f in self._futures]  # order preserved
        return _Decoded([row for row, _ in done], sum(dt for _, dt in done))


def _timed_prepare(raw: RawSample, opts: DecodeOptions) -> tuple[PreparedSample, float]:
    t0 = time.perf_counter()
    row = prepare(raw, opts)
    return row, time.perf_counter() - t0


def _submit_decode(
    pool: ThreadPoolExecutor, batch: list[RawSample], opts: DecodeOptions
) -> _DecodedBatch:
    return _DecodedBatch(pool, batch, opts)


def _encode_and_write(
    decoded: _Decoded,
    ctx: ShardContext,
    writer: ShardWriter,
    timings: StageTimings,
    skips: SkipLogger,
) -> None:
    timings.decode += decoded.seconds
    rows = decoded.rows
    n = len(rows)
    t0 = time.perf_counter()
    has_image = np.array([r.pixels is not None for r in rows], dtype=bool)
    has_text = np.array(
        [r.raw.caption is not None and r.raw.keeps_caption() for r in rows], dtype=bool
    )
    dim = ctx.loaded.embed_dim
    img = np.full((n, dim), np.nan, np.float32) if has_image.any() else None
    txt = np.full((n, dim), np.nan, np.float32) if has_text.any() else None
    truncated = [False] * n
    try:
        if img is not None:
            pixels = np.stack([r.pixels for r in rows if r.pixels is not None])
            img[has_image] = ctx.encoder.encode_images(pixels)
        if txt is not None:
            captions = [r.raw.caption for r, m in zip(rows, has_text, strict=True) if m]
            emb, flags = ctx.encoder.encode_texts(captions)
            txt[has_text] = emb
            for i, flag in zip(np.flatnonzero(has_text), flags, strict=True):
                truncated[i] = flag
    except Exception as e:
        if is_oom(e):
            raise
        # A batch the model rejects should not lose its rows: record them.
        for r in rows:
            if r.raw.status == OK:
                r.raw.status, r.raw.error = ENCODE_ERROR, f"{type(e).__name__}: {e}"
        has_image[:] = False
        has_text[:] = False
        img = txt = None
    if ctx.config.sink.normalize:
        if img is not None:
            img = l2_normalize(img)
        if txt is not None:
            txt = l2_normalize(txt)
    for r in rows:
        if r.raw.status != OK:
            skips.record(r.raw.key, r.raw.status, r.raw.error)
    timings.encode += time.perf_counter() - t0
    t1 = time.perf_counter()
    writer.write(RowBlock(rows, img, txt, has_image, has_text, truncated))
    timings.write += time.perf_counter() - t1
    if ctx.progress:
        ctx.progress(n)


def file_metadata(shard: ShardSpec, ctx: ShardContext) -> dict[str, Any]:
    cfg = ctx.config
    ckpt = ctx.loaded.checkpoint
    return {
        "package": "clipbatch",
        "package_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "model": {
            "name": ckpt.display_name,
            "checkpoint_sha256": ckpt.sha256,
            "embed_dim": ctx.loaded.embed_dim,
            "input_resolution": ctx.loaded.input_resolution,
            "context_length": ctx.encoder.context_tokens,
            "trained": ckpt.trained,
        },
        "preprocessing": {
            "mode": cfg.runtime.preprocess,
            "resize": f"shortest side to {ctx.loaded.input_resolution}, bicubic",
            "crop": "center",
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
        },
        "dtype": cfg.sink.dtype,
        "normalized": cfg.sink.normalize,
        "options": output_options(cfg),
        "source": {
            "uri": shard.uri,
            "version": shard.version,
            "kind": shard.kind,
            "sidecar": shard.sidecar_uri,
        },
        "run": {"run_id": ctx.run_id, **ctx.run_meta},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
