"""The per-image part of CLIP's preprocessing, in uint8: resize the short side, centre-crop.

Two modes, both giving uint8 HxWx3 at the model resolution; ToTensor and Normalize
happen later, batched, on the device (:meth:`clipbatch.encode.ClipEncoder.pixels_to_input`).

- ``exact``: the same torchvision calls on the same PIL image as the model's own
  transform, so the pixels (and so the embeddings) are bit-identical to the reference.
- ``fast``: torch's uint8 bicubic resize with antialiasing. It uses the same kernel as
  PIL (a = -0.5, support scaled with the reduction) in SIMD code, about 3x faster than
  PIL on one core; pixels differ from PIL's by at most 1 on a small fraction of pixels
  (fixed-point rounding), so the embeddings agree to a cosine well above 0.9999
  (measured in bench/ and asserted in tests/test_hot_path.py). Callers may pair it with
  JPEG draft decoding (DCT-domain downscaling) for large images.

Optional GPU decoding (:func:`decode_jpegs_on_device`) batches ``torchvision.io.decode_jpeg``
on a CUDA device and falls back per image to the CPU path for anything it cannot decode.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

log = logging.getLogger(__name__)

MODES = ("exact", "fast")


def resized_size(width: int, height: int, n_px: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(n_px)``: short side to n_px, long side truncated."""
    if width <= height:
        return n_px, int(n_px * height / width)
    return int(n_px * width / height), n_px


def crop_offsets(width: int, height: int, n_px: int) -> tuple[int, int]:
    """(left, top) of torchvision's ``CenterCrop(n_px)`` on a width x height image."""
    return int(round((width - n_px) / 2.0)), int(round((height - n_px) / 2.0))


def resize_crop(rgb: Image.Image, n_px: int, mode: str = "exact") -> np.ndarray:
    """uint8 n_px x n_px x 3 from an RGB PIL image, by ``mode`` (see the module docstring)."""
    if mode == "exact":
        resized = TF.resize(rgb, n_px, interpolation=InterpolationMode.BICUBIC)
        return np.asarray(TF.center_crop(resized, n_px), dtype=np.uint8)
    if mode == "fast":
        # A writable copy: torch does not take read-only numpy buffers without a warning.
        return resize_crop_array(np.array(rgb, dtype=np.uint8), n_px)
    raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {MODES}")


def resize_crop_array(pixels: np.ndarray, n_px: int) -> np.ndarray:
    """The ``fast`` resize and crop of a uint8 HxWx3 array (CPU)."""
    t = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)
    return resize_crop_tensor(t, n_px)[0].permute(1, 2, 0).contiguous().numpy()


def resize_crop_tensor(t: torch.Tensor, n_px: int) -> torch.Tensor:
    """uint8 1x3xHxW (any device) -> uint8 1x3xn_pxxn_px, as torchvision Resize+CenterCrop."""
    height, width = int(t.shape[-2]), int(t.shape[-1])
    new_w, new_h = resized_size(width, height, n_px)
    if (new_w, new_h) != (width, height):
        if t.device.type == "cpu":
            # Channels-last uint8 takes torch's vectorised antialiased path on the CPU.
            t = F.interpolate(
                t.contiguous(memory_format=torch.channels_last),
                size=(new_h, new_w),
                mode="bicubic",
                antialias=True,
                align_corners=False,
            )
        else:
            t = resize_via_float(t, new_h, new_w)
    left, top = crop_offsets(new_w, new_h, n_px)
    return t[..., top : top + n_px, left : left + n_px]


def resize_via_float(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bicubic resize of uint8 NCHW through float32, then rounded back to uint8.

    CUDA's interpolation kernels take floating point only (torch's uint8 path is
    CPU-only); the float path uses the same PIL-like kernel, and bicubic overshoot is
    clamped as PIL clamps it.
    """
    out = F.interpolate(
        t.float(), size=(height, width), mode="bicubic", antialias=True, align_corners=False
    )
    return out.round_().clamp_(0, 255).to(torch.uint8)


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
) -> list[torch.Tensor | np.ndarray | None]:
    """Decode a batch of JPEGs with ``torchvision.io.decode_jpeg`` on ``device``, resize+crop there.

    Returns, per input, a uint8 3xn_pxxn_px tensor on the device, or whatever
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
                    out[i] = resize_crop_tensor(img.unsqueeze(0), n_px)[0]
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
