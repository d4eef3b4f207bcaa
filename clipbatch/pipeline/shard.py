"""One shard, end to end: read -> decode/preprocess -> encode -> write -> commit.

The stages overlap, each bounded (:mod:`clipbatch.window`): a reader thread
reads rows ahead, the next batch decodes while the model encodes the current one, and
at most two blocks wait for the writer thread. Memory is bounded by those windows, not
by the shard's or the dataset's size.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from clipbatch.config import EmbedConfig
from clipbatch.encode.batch import encode_batch
from clipbatch.encode.encoder import ClipEncoder
from clipbatch.errors import TooManyErrorsError
from clipbatch.models.loading import LoadedModel
from clipbatch.pipeline.metadata import file_metadata
from clipbatch.preprocess.batches import BatchDecoder
from clipbatch.preprocess.decode import DecodeOptions
from clipbatch.preprocess.device import gpu_decode_available
from clipbatch.records import RawSample, RowBlock, ShardResult, ShardSpec, StageTimings
from clipbatch.sink.writer import ShardWriter
from clipbatch.skiplog import SkipLogger
from clipbatch.sources.base import ShardReader
from clipbatch.window import ordered, prefetch

log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]
T = TypeVar("T")


@dataclass
class ShardContext:
    """What a shard run needs besides the shard (see :class:`clipbatch.pipeline.worker.Worker`)."""

    config: EmbedConfig
    reader: ShardReader
    loaded: LoadedModel
    encoder: ClipEncoder
    run_id: str
    run_meta: dict[str, Any] = field(default_factory=dict)  # flow run ids etc., for file metadata
    progress: ProgressFn | None = None


def process_shard(shard: ShardSpec, ctx: ShardContext, fingerprint: str) -> ShardResult:
    """Encode and commit one shard. Raises :class:`TooManyErrorsError` after committing."""
    cfg, timings, start = ctx.config, StageTimings(), time.perf_counter()
    writer = shard_writer(shard, ctx, fingerprint)
    skips = SkipLogger(log, shard.name)
    writes = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"write-{shard.name}")

    def write(block: RowBlock) -> None:
        with timed(timings, "write"):
            writer.write(block)
        if ctx.progress:
            ctx.progress(len(block.rows))

    try:
        with encoded_blocks(ctx.reader.read(shard), ctx, shard.name, timings, skips) as blocks:
            for _, done in ordered(blocks, lambda b: writes.submit(write, b), ahead=2):
                done.result()  # type: ignore[union-attr]
        with timed(timings, "write"):
            final_uri, sha, version = writer.close_and_commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        writes.shutdown(wait=True, cancel_futures=True)
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
    if result.rows and result.failed_rows / result.rows > cfg.runtime.max_error_ratio:
        raise TooManyErrorsError(
            shard.name, result.failed_rows, result.rows, cfg.runtime.max_error_ratio
        )
    return result


def shard_writer(shard: ShardSpec, ctx: ShardContext, fingerprint: str) -> ShardWriter:
    """The writer of ``shard``'s file, with its file metadata (model, options, run)."""
    cfg = ctx.config
    return ShardWriter(
        cfg.sink,
        shard.name,
        ctx.run_id,
        ctx.loaded.embed_dim,
        ctx.reader.passthrough_fields(shard),
        shard.uri,
        shard.version,
        metadata=file_metadata(shard, cfg, ctx.loaded, ctx.encoder, ctx.run_id, ctx.run_meta),
        fingerprint=fingerprint,
    )


@contextlib.contextmanager
def encoded_blocks(
    rows: Iterable[RawSample],
    ctx: ShardContext,
    name: str,
    timings: StageTimings,
    skips: SkipLogger,
) -> Iterator[Iterator[RowBlock]]:
    """``rows`` read ahead in a thread, decoded a batch ahead on the pool, encoded: blocks
    of rows ready to write, in order. Leaving the block stops the reader and the pool."""
    size = ctx.encoder.batch_size
    with (
        prefetch(timed_iter(rows, timings), 4 * size, f"read-{name}") as ahead,
        BatchDecoder(decode_options(ctx), ctx.encoder, decode_workers(ctx.config), name) as decoder,
    ):
        decoded = ordered(chunked(ahead, size), decoder.submit, ahead=2)
        yield (_encode(f.result(), ctx, skips, timings) for _, f in decoded)


def _encode(decoded: Any, ctx: ShardContext, skips: SkipLogger, timings: StageTimings) -> RowBlock:
    timings.decode += decoded.seconds
    with timed(timings, "encode"):
        return encode_batch(decoded, ctx.encoder, ctx.config.sink.normalize, skips)


def decode_options(ctx: ShardContext) -> DecodeOptions:
    mode = ctx.config.runtime.preprocess
    if mode == "gpu" and not gpu_decode_available(str(ctx.encoder.device)):
        _warn_no_device_decoder(str(ctx.encoder.device))
    return DecodeOptions(
        n_px=ctx.loaded.input_resolution,
        mode=mode,
        max_pixels=ctx.config.runtime.max_image_pixels,
        geometry=ctx.loaded.image_preprocess,
    )


def decode_workers(config: EmbedConfig) -> int:
    return config.runtime.decode_workers or max(1, os.cpu_count() or 1)


def chunked(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


class timed:  # noqa: N801 - used as a context manager, like contextlib's helpers
    """Add the seconds a block takes to ``timings.<stage>``."""

    def __init__(self, timings: StageTimings, stage: str) -> None:
        self.timings, self.stage = timings, stage

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.t0
        setattr(self.timings, self.stage, getattr(self.timings, self.stage) + elapsed)


def timed_iter(items: Iterable[T], timings: StageTimings) -> Iterator[T]:
    """``items``, with the time spent producing them added to ``timings.read``."""
    it = iter(items)
    while True:
        t0 = time.perf_counter()
        try:
            item = next(it)
        except StopIteration:
            return
        timings.read += time.perf_counter() - t0
        yield item


@functools.cache
def _warn_no_device_decoder(device: str) -> None:
    log.warning(
        "preprocess='gpu' on %s, which has no CUDA JPEG decoder: torchvision's CPU decoder "
        "decodes each batch in one thread, slower than 'fast' or 'exact' there",
        device,
    )
