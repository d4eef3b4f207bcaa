"""A batch of rows decoded and gathered for the model: pixels stacked, captions tokenised.

Images are decoded on a thread pool (one per core by default); one more thread gathers
each batch (stacks the pixels, pinned on CUDA; runs the batched device JPEG decode in
``gpu`` mode; tokenises the captions), so the encode loop only ever waits for the model.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
import torch

from clipbatch.preprocess.decode import DecodeOptions, finish_on_device, prepare
from clipbatch.records import PreparedSample, RawSample


@dataclass
class DecodedBatch:
    rows: list[PreparedSample]
    seconds: float  # decode time summed over the decode threads
    pixels: np.ndarray | torch.Tensor | None = None  # stacked uint8 NxHxWx3, pinned on CUDA
    tokens: Any = None  # captions of the rows that have one, tokenised
    truncated: list[bool] = field(default_factory=list)


def has_text(row: PreparedSample) -> bool:
    """Whether a row's caption is encoded (it has one, and its status keeps it)."""
    return row.raw.caption is not None and row.raw.keeps_caption()


class BatchDecoder:
    """Decodes batches of rows ahead of the model; a context manager owning its threads."""

    def __init__(self, opts: DecodeOptions, encoder: Any, workers: int, name: str) -> None:
        self.opts = opts
        self.encoder = encoder
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"decode-{name}")
        self._gather = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batch-{name}")

    def submit(self, batch: list[RawSample]) -> Future[DecodedBatch]:
        futures = [self._pool.submit(_timed_prepare, r, self.opts) for r in batch]
        return self._gather.submit(self._assemble, futures)

    def __enter__(self) -> BatchDecoder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._gather.shutdown(wait=True, cancel_futures=True)

    def _assemble(self, futures: list[Future]) -> DecodedBatch:
        done = [f.result() for f in futures]  # order preserved
        rows = [row for row, _ in done]
        out = DecodedBatch(rows, sum(dt for _, dt in done))
        encoder = self.encoder
        if self.opts.mode == "gpu":
            t0 = time.perf_counter()
            finish_on_device(rows, self.opts, str(encoder.device))
            out.seconds += time.perf_counter() - t0
        images = [r.pixels for r in rows if r.pixels is not None]
        if any(isinstance(p, torch.Tensor) for p in images):
            # Decoded on the device; the few the device decoder refused join them there.
            out.pixels = torch.stack([_on_device(p, encoder.device) for p in images])
        elif images:
            stacked = torch.from_numpy(np.stack(images))
            out.pixels = stacked.pin_memory() if encoder.pins_memory else stacked
        captions = [r.raw.caption for r in rows if has_text(r)]
        if captions:
            out.tokens, out.truncated = encoder.tokenize(captions)
            if encoder.pins_memory:
                out.tokens = out.tokens.pin_memory()
        return out


def _timed_prepare(raw: RawSample, opts: DecodeOptions) -> tuple[PreparedSample, float]:
    t0 = time.perf_counter()
    row = prepare(raw, opts)
    return row, time.perf_counter() - t0


def _on_device(pixels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    if isinstance(pixels, torch.Tensor):
        return pixels.to(device)
    return torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
