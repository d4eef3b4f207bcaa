"""Batched JPEG decoding on the model's device (``preprocess: gpu``).

:func:`decode_jpegs_on_device` batches ``torchvision.io.decode_jpeg`` on a CUDA device
(nvJPEG) and resizes there with the family's geometry; anything it cannot decode falls
back, per image, to the CPU path.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from clipbatch.preprocess.resize import ImagePreprocess, resize_crop_tensor

log = logging.getLogger(__name__)


def gpu_decode_available(device: str) -> bool:
    """GPU JPEG decoding needs a CUDA device and torchvision's nvjpeg support."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except ImportError:  # pragma: no cover - torchvision always ships it today
        return False
    return True


def decode_jpegs_on_device(
    datas: Sequence[bytes],
    n_px: int,
    device: str,
    cpu_fallback: Callable[[int], np.ndarray | None],
    geometry: ImagePreprocess | None = None,
) -> list[torch.Tensor | np.ndarray | None]:
    """Decode a batch of JPEGs with ``torchvision.io.decode_jpeg`` on ``device``, resize+crop there.

    ``geometry`` is the family's preprocessing (None: OpenAI CLIP's at ``n_px``).
    Returns, per input, a uint8 3xHxW tensor at the model's size on the device, or whatever
    ``cpu_fallback(index)`` returns for an input the batched decode could not take (not a
    baseline JPEG, CMYK, corrupt, ...). Orientation is not applied by nvjpeg, so inputs
    with EXIF orientation go to the fallback too.
    """
    out: list[torch.Tensor | np.ndarray | None] = [None] * len(datas)
    todo = [i for i, d in enumerate(datas) if plain_jpeg(d)]
    if todo:
        with _private_stream(device) as consumer:
            for i, img in zip(todo, _decode_batch([datas[i] for i in todo], device), strict=True):
                if img is not None:
                    out[i] = resize_crop_tensor(img.unsqueeze(0), n_px, geometry)[0]
        if consumer is not None:
            for i in todo:
                t = out[i]
                if isinstance(t, torch.Tensor):
                    t.record_stream(consumer)  # not reused while the model's stream reads it
    for i in range(len(datas)):
        if out[i] is None:
            out[i] = cpu_fallback(i)
    return out


def _decode_batch(datas: Sequence[bytes], device: str) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode, decode_jpeg

    inputs = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return list(decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError as e:  # one bad image fails the batch: retry one by one
        log.debug("batched device decode failed (%s); decoding one by one", e)
        return [_decode_one(x, device) for x in inputs]


_streams = threading.local()


@contextlib.contextmanager
def _private_stream(device: str) -> Iterator[torch.cuda.Stream | None]:
    """On CUDA, run the block on this thread's private stream, idle before and after.

    Yields the caller's stream (the consumer of the results), or None off CUDA.
    torchvision's CUDA decoder allocates its outputs on the current stream but writes
    them from a stream of its own without waiting (pytorch/vision#9606): on the model's
    stream it could be handed a block that queued kernels still read. A private stream
    that is idle when the decode starts only owns idle blocks.
    """
    if not device.startswith("cuda"):
        yield None
        return
    consumer = torch.cuda.current_stream(device)
    streams: dict[str, torch.cuda.Stream] = getattr(_streams, "by_device", {})
    _streams.by_device = streams
    stream = streams.get(device)
    if stream is None:
        stream = streams[device] = torch.cuda.Stream(device)
    stream.synchronize()
    with torch.cuda.stream(stream):
        yield consumer
    stream.synchronize()  # results complete before the model's stream reads them


def _decode_one(data: torch.Tensor, device: str) -> torch.Tensor | None:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def plain_jpeg(data: bytes) -> bool:
    """A JPEG without an EXIF block (orientation would need a transpose nvjpeg does not do)."""
    return data[:3] == b"\xff\xd8\xff" and b"Exif\x00\x00" not in data[:65536]
