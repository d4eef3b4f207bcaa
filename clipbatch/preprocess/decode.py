"""Decode image bytes and do the per-image part of the model's preprocessing, in uint8.

A model's reference transform is resize -> (pad) -> crop -> RGB -> ToTensor -> Normalize;
for OpenAI CLIP Resize(n_px, bicubic) -> CenterCrop(n_px), for other families what their
own preprocessing says (:class:`clipbatch.preprocess.resize.ImagePreprocess`, carried in
:class:`DecodeOptions`). Resize and crop must happen per image; ToTensor and Normalize
are a batched multiply-add, done later on the device (:mod:`clipbatch.encode.encoder`). In
"exact" mode resize and crop call the same functions on the same image as the family's
reference, so the pixels are identical to it.

Every failure becomes a row status: nothing here raises for bad data. The format is
sniffed from the bytes, never taken from the file name, so a PNG named ``.webp`` simply
decodes (status ``ok``); the pixel limit is checked from the header, before decoding.
"""

from __future__ import annotations

import hashlib
import io
import logging
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from clipbatch.preprocess.device import decode_jpegs_on_device, plain_jpeg
from clipbatch.preprocess.resize import ImagePreprocess, resize_crop
from clipbatch.records import DECODE_ERROR, MISSING_IMAGE, OK, TOO_LARGE, PreparedSample, RawSample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeOptions:
    n_px: int
    mode: str = "exact"  # exact | fast | gpu
    max_pixels: int = 89_478_485
    # The model family's preprocessing; None is OpenAI CLIP's at n_px.
    geometry: ImagePreprocess | None = None

    @property
    def cpu(self) -> DecodeOptions:
        """The options for decoding on the CPU: ``gpu`` mode falls back to ``fast``."""
        return replace(self, mode="fast") if self.mode == "gpu" else self

    @property
    def image(self) -> ImagePreprocess:
        """The preprocessing in effect."""
        return self.geometry or ImagePreprocess.clip(self.n_px)


def prepare(raw: RawSample, opts: DecodeOptions) -> PreparedSample:
    """Decode ``raw.image_bytes`` into a uint8 HxWx3 array at the model resolution."""
    out = PreparedSample(raw=raw)
    data = raw.image_bytes
    if data is None:
        if raw.status == OK and raw.has_image_field:
            raw.status, raw.error = MISSING_IMAGE, "no image bytes"
        return out
    out.image_sha256 = hashlib.sha256(data).digest()
    if not raw.keeps_image():
        return out
    try:
        if opts.mode == "gpu" and _defer_to_device(out, data, opts):
            return out
        pixels, width, height = decode_to_pixels(data, opts.cpu)
    except _TooLarge as e:
        _fail(raw, TOO_LARGE, str(e))
        return out
    except Image.DecompressionBombError as e:
        # PIL refuses far larger images (2x its own limit) from the header in Image.open,
        # before our check runs; the row gets the same status and names our limit.
        _fail(raw, TOO_LARGE, f"more than max_image_pixels {opts.max_pixels:,}: {e}")
        return out
    except Exception as e:  # noqa: BLE001 - any decoder failure is a row status, by design
        _fail(raw, DECODE_ERROR, _describe(e, data))
        return out
    out.pixels, out.width, out.height = pixels, width, height
    return out


class _TooLarge(Exception):
    pass


def _check_pixels(width: int, height: int, opts: DecodeOptions) -> None:
    if width * height > opts.max_pixels:
        raise _TooLarge(
            f"{width}x{height} = {width * height:,} pixels exceeds max_image_pixels "
            f"{opts.max_pixels:,} (checked from the header, not decoded)"
        )


def _defer_to_device(out: PreparedSample, data: bytes, opts: DecodeOptions) -> bool:
    """Leave a plain RGB/grey JPEG for the device decoder; header checks happen here."""
    if not plain_jpeg(data):
        return False
    with Image.open(io.BytesIO(data)) as img:  # reads the header only
        width, height = img.size
        _check_pixels(width, height, opts)
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):  # CMYK etc.: the CPU path
            return False
    out.deferred_jpeg, out.width, out.height = data, width, height
    return True


def finish_on_device(rows: list[PreparedSample], opts: DecodeOptions, device: str) -> None:
    """Decode the batch's deferred JPEGs together on ``device`` (preprocess="gpu").

    Each becomes a uint8 n_px x n_px x 3 tensor on the device; one the device decoder
    cannot take is decoded on the CPU (``fast`` mode), and one neither can decode gets a
    ``decode_error`` status, exactly as on the CPU path.
    """
    todo = [r for r in rows if r.deferred_jpeg is not None]
    if not todo:
        return
    datas = [r.deferred_jpeg for r in todo]
    errors: dict[int, Exception] = {}

    def on_cpu(index: int) -> np.ndarray | None:
        try:
            return decode_to_pixels(datas[index], opts.cpu)[0]
        except Exception as e:  # noqa: BLE001 - recorded as the row's status below
            errors[index] = e
            return None

    decoded = decode_jpegs_on_device(datas, opts.n_px, device, on_cpu, opts.geometry)
    for i, (row, pixels) in enumerate(zip(todo, decoded, strict=True)):
        data, row.deferred_jpeg = row.deferred_jpeg, None
        if pixels is None:
            assert data is not None
            _fail(row.raw, DECODE_ERROR, _describe(errors[i], data))
            row.width = row.height = None
        elif isinstance(pixels, np.ndarray):
            row.pixels = pixels
        else:
            row.pixels = pixels.permute(1, 2, 0)  # HxWx3, as the CPU path gives


def decode_to_pixels(data: bytes, opts: DecodeOptions) -> tuple[np.ndarray, int, int]:
    if not data:
        raise ValueError("zero-byte image")
    opts = opts.cpu
    with Image.open(io.BytesIO(data)) as img:
        width, height = img.size
        _check_pixels(width, height, opts)
        if opts.mode == "fast" and img.format == "JPEG":
            # DCT-domain downscaling to 1/2 or 1/4 scale (1/8 is too coarse), never below
            # 1.5 x n_px (2 x below 128 px, where the tiny ResNet tower measured a cosine of
            # 0.9998 at 1.5 x): embeddings stay within a cosine of 0.9999 of the reference
            # (tests/preprocess/test_hot_path.py, bench/RESULTS.md).
            # For other families the floor is taken from the largest output side.
            n_px = opts.image.n_px
            floor = 2 * n_px if n_px < 128 else 3 * n_px // 2
            img.draft("RGB", (max(floor, width // 4), max(floor, height // 4)))
        img.load()
        oriented = ImageOps.exif_transpose(img)
        if oriented is not None and oriented.size != img.size:
            width, height = height, width  # rotated by 90; draft may have shrunk img.size
        rgb = to_rgb(oriented if oriented is not None else img)
    return resize_crop(rgb, opts.n_px, opts.mode, opts.geometry), width, height


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any mode: 16-bit scaled (not clipped), alpha composited on white, CMYK converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.uint32 if img.mode == "I" else np.uint16)
        peak = 65535 if arr.max(initial=0) > 255 else 255
        arr8 = (arr.astype(np.float32) * (255.0 / peak)).round().clip(0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def _fail(raw: RawSample, status: str, error: str) -> None:
    # A caption problem recorded earlier is less important than an unusable image.
    raw.status, raw.error = status, error


def _describe(e: Exception, data: bytes) -> str:
    if isinstance(e, UnidentifiedImageError):
        head = data[:16]
        kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "unknown binary"
        return f"not an image ({kind} content, {len(data):,} bytes)"
    return f"{type(e).__name__}: {e}"
