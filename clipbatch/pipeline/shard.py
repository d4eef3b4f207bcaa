"""One shard, end to end: read -> decode/preprocess -> encode -> write -> commit.

Stages overlap: a reader thread streams rows into a bounded queue, a thread pool
decodes the next batch while the model encodes the current one, and memory is
bounded by the queue sizes, not by the shard or dataset size.
"""

from __future__ import annotations

import functools
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
import torch

from clipbatch import __version__
from clipbatch.config import EmbedConfig
from clipbatch.encode.encoder import ClipEncoder, is_oom, l2_normalize
from clipbatch.errors import TooManyErrorsError
from clipbatch.models.loading import LoadedModel
from clipbatch.pipeline.skiplog import SkipLogger
from clipbatch.plan.fingerprint import output_options
from clipbatch.preprocess.decode import DecodeOptions, finish_on_device, prepare
from clipbatch.preprocess.resize import ImagePreprocess, gpu_decode_available
from clipbatch.records import (
    ENCODE_ERROR,
    OK,
    PreparedSample,
    RawSample,
    ShardResult,
    ShardSpec,
    StageTimings,
)
from clipbatch.sink.schema import SCHEMA_VERSION
from clipbatch.sink.writer import RowBlock, ShardWriter
from clipbatch.sources.base import ShardReader

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


_auto_sizes: dict[tuple[str, str, str], int] = {}
_auto_lock = threading.Lock()


def auto_batch_size(encoder: ClipEncoder, start: int) -> int:
    """Probe the largest batch that fits once per process and model; later shards reuse it."""
    loaded = encoder.loaded
    key = (loaded.checkpoint.sha256, loaded.device, str(loaded.dtype))
    with _auto_lock:
        if key not in _auto_sizes:
            _auto_sizes[key] = encoder.find_batch_size(start=start)
        encoder.batch_size = _auto_sizes[key]
    return encoder.batch_size


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
        geometry=ctx.loaded.image_preprocess,
    )
    writer = ShardWriter(
        cfg.sink,
        shard.name,
        ctx.run_id,
        ctx.loaded.embed_dim,
        ctx.reader.passthrough_fields(shard),
        shard.uri,
        shard.version,
        metadata=file_metadata(shard, ctx),
        fingerprint=fingerprint,
    )
    skips = SkipLogger(log, shard.name)
    if opts.mode == "gpu" and not gpu_decode_available(str(ctx.encoder.device)):
        _warn_no_device_decoder(str(ctx.encoder.device))
    if cfg.runtime.auto_batch_size:
        auto_batch_size(ctx.encoder, cfg.runtime.batch_size)
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
    # One thread gathers each batch (stack, pin, tokenise) and one writes Parquet, so the
    # encode loop below only ever waits for the model.
    assembler = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{shard.name}")
    writer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write-{shard.name}")
    writes: list[Future] = []
    reader_thread.start()
    try:
        pending: Future | None = None
        for raw_batch in _batches(rows_q, batch_size):
            submitted = _submit_batch(pool, assembler, raw_batch, opts, ctx.encoder)
            if pending is not None:
                _encode_and_write(
                    pending.result(), ctx, writer, writer_pool, writes, timings, skips
                )
            pending = submitted
        if pending is not None:
            _encode_and_write(pending.result(), ctx, writer, writer_pool, writes, timings, skips)
        for w in writes:
            w.result()
        t0 = time.perf_counter()
        final_uri, sha, version = writer.close_and_commit()
        timings.write += time.perf_counter() - t0
    except BaseException:
        stop.set()
        for w in writes:
            w.cancel()
        writer_pool.shutdown(wait=True)
        writer.abort()
        raise
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        assembler.shutdown(wait=True, cancel_futures=True)
        writer_pool.shutdown(wait=True)
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
        file_version=version,
    )
    failed = result.failed_rows
    if result.rows and failed / result.rows > cfg.runtime.max_error_ratio:
        raise TooManyErrorsError(shard.name, failed, result.rows, cfg.runtime.max_error_ratio)
    return result


@functools.cache
def _warn_no_device_decoder(device: str) -> None:
    log.warning(
        "preprocess='gpu' on %s, which has no CUDA JPEG decoder: torchvision's CPU decoder "
        "decodes each batch in one thread, slower than 'fast' or 'exact' there",
        device,
    )


@dataclass
class _Decoded:
    rows: list[PreparedSample]
    seconds: float  # decode time summed over the decode threads
    pixels: np.ndarray | torch.Tensor | None = None  # stacked uint8 NxHxWx3, pinned on CUDA
    tokens: torch.Tensor | None = None  # captions of the rows with a caption, tokenised
    truncated: list[bool] = field(default_factory=list)


def _timed_prepare(raw: RawSample, opts: DecodeOptions) -> tuple[PreparedSample, float]:
    t0 = time.perf_counter()
    row = prepare(raw, opts)
    return row, time.perf_counter() - t0


def _submit_batch(
    pool: ThreadPoolExecutor,
    assembler: ThreadPoolExecutor,
    batch: list[RawSample],
    opts: DecodeOptions,
    encoder: ClipEncoder,
) -> Future:
    """Decode the batch's images on the pool; gather them and tokenise on the assembler."""
    futures = [pool.submit(_timed_prepare, r, opts) for r in batch]
    return assembler.submit(_assemble, futures, opts, encoder)


def _assemble(futures: list[Future], opts: DecodeOptions, encoder: ClipEncoder) -> _Decoded:
    done = [f.result() for f in futures]  # order preserved
    rows = [row for row, _ in done]
    out = _Decoded(rows, sum(dt for _, dt in done))
    if opts.mode == "gpu":
        t0 = time.perf_counter()
        finish_on_device(rows, opts, str(encoder.device))
        out.seconds += time.perf_counter() - t0
    images = [r.pixels for r in rows if r.pixels is not None]
    if any(isinstance(p, torch.Tensor) for p in images):
        # Decoded on the device; the few the device decoder refused join them there.
        out.pixels = torch.stack([_on_device(p, encoder.device) for p in images])
    elif images:
        stacked = torch.from_numpy(np.stack(images))
        out.pixels = stacked.pin_memory() if encoder.pins_memory else stacked
    captions = [r.raw.caption for r in rows if _has_text(r)]
    if captions:
        out.tokens, out.truncated = encoder.tokenize(captions)
        if encoder.pins_memory:
            out.tokens = out.tokens.pin_memory()
    return out


def _on_device(pixels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(pixels, torch.Tensor):
        return pixels.to(device)
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(device)


def _has_text(r: PreparedSample) -> bool:
    return r.raw.caption is not None and r.raw.keeps_caption()


def _encode_and_write(
    decoded: _Decoded,
    ctx: ShardContext,
    writer: ShardWriter,
    writer_pool: ThreadPoolExecutor,
    writes: list[Future],
    timings: StageTimings,
    skips: SkipLogger,
) -> None:
    timings.decode += decoded.seconds
    rows = decoded.rows
    n = len(rows)
    t0 = time.perf_counter()
    has_image = np.array([r.pixels is not None for r in rows], dtype=bool)
    has_text = np.array([_has_text(r) for r in rows], dtype=bool)
    dim = ctx.loaded.embed_dim
    img = np.full((n, dim), np.nan, np.float32) if has_image.any() else None
    txt = np.full((n, dim), np.nan, np.float32) if has_text.any() else None
    truncated = [False] * n
    try:
        if img is not None and decoded.pixels is not None:
            img[has_image] = ctx.encoder.encode_images(decoded.pixels)
        if txt is not None and decoded.tokens is not None:
            txt[has_text] = ctx.encoder.encode_tokens(decoded.tokens)
            for i, flag in zip(np.flatnonzero(has_text), decoded.truncated, strict=True):
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
    # Parquet encoding and upload run on the writer thread; two blocks in flight at most,
    # so memory stays bounded when the sink is slower than the model.
    while len(writes) >= 2:
        writes.pop(0).result()
    block = RowBlock(rows, img, txt, has_image, has_text, truncated)
    writes.append(writer_pool.submit(_timed_write, ctx, writer, block, timings))


def _timed_write(
    ctx: ShardContext, writer: ShardWriter, block: RowBlock, timings: StageTimings
) -> None:
    t1 = time.perf_counter()
    writer.write(block)
    timings.write += time.perf_counter() - t1
    if ctx.progress:
        ctx.progress(len(block.rows))


RESIZE_NOTES = {
    "exact": " (as the model family's own transform: {resampler})",
    "fast": " (torch uint8, antialiased; JPEG draft decoding at 1/2 or 1/4, >= 1.5x that size)",
    "gpu": " (plain JPEGs decoded batched on the model's device, antialiased resize there, "
    "float32 on CUDA; other images as 'fast' on the CPU)",
}
_RESAMPLERS = {"pil": "PIL", "torch": "torch uint8, antialiased"}


def describe_resize(image: ImagePreprocess, mode: str) -> str:
    """The resize step in words, e.g. 'shortest side to 224, bicubic (PIL, ...)'."""
    height, width = image.size
    if image.resize_mode == "squash":
        squash_h, squash_w = image.squash_size or image.size
        what = f"squashed to {squash_w}x{squash_h}"
    elif image.resize_mode == "longest":
        what = f"longest side to fit {width}x{height}, padded with {image.fill}"
    elif image.shortest_edge is not None:
        what = f"shortest side to {image.shortest_edge}"
    else:
        what = f"shortest side to fit {width}x{height}"
    note = RESIZE_NOTES[mode].replace("{resampler}", _RESAMPLERS[image.resampler])
    return f"{what}, {image.interpolation}{note}"


def file_metadata(shard: ShardSpec, ctx: ShardContext) -> dict[str, Any]:
    cfg = ctx.config
    loaded = ctx.loaded
    ckpt = loaded.checkpoint
    image = loaded.image_preprocess
    text = ctx.encoder.text_metadata()
    return {
        "package": "clipbatch",
        "package_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "model": {
            "name": ckpt.display_name,
            "checkpoint_sha256": ckpt.sha256,
            "embed_dim": loaded.embed_dim,
            "input_resolution": loaded.input_resolution,
            "context_length": ctx.encoder.context_tokens,  # the caption limit in effect
            "trained": ckpt.trained,
            **ckpt.identity(),
            "text": text,
        },
        "preprocessing": {
            "mode": cfg.runtime.preprocess,
            "resize": describe_resize(image, cfg.runtime.preprocess),
            "crop": (f"center, {image.crop_rounding}ed offsets" if image.crop else "none"),
            "mean": list(image.mean),
            "std": list(image.std),
            "size": [image.size[0], image.size[1]],
            "image": image.describe(),
            "tokenizer": text["tokenizer"],
            "max_caption_tokens": text["max_caption_tokens"],
        },
        "dtype": cfg.sink.dtype,
        "normalized": cfg.sink.normalize,
        "options": output_options(cfg, context_length=loaded.context_length),
        "source": {
            "uri": shard.uri,
            "version": shard.version,
            "kind": shard.kind,
            "sidecar": shard.sidecar_uri,
        },
        "run": {"run_id": ctx.run_id, **ctx.run_meta},
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
