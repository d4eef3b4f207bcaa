"""The per-image part of CLIP's preprocessing, in uint8: resize the short side, centre-crop.

Two modes, both giving uint8 HxWx3 at the model resolution; ToTensor and Normalize
happen later, batched, on the device (:meth:`clipbatch.encode.encoder.ClipEncoder.pixels_to_input`).

- ``exact``: the same torchvision calls on the same PIL image as the model's own
  transform, so the pixels (and so the embeddings) are bit-identical to the reference.
- ``fast``: torch's uint8 bicubic resize with antialiasing. It uses the same kernel as
  PIL (a = -0.5, support scaled with the reduction) in SIMD code, about 3x faster than
  PIL on one core; pixels differ from PIL's by at most 1 on a small fraction of pixels
  (fixed-point rounding), so the embeddings agree to a cosine well above 0.9999
  (measured in bench/ and asserted in tests/preprocess/test_hot_path.py). Callers may pair it with
  JPEG draft decoding (DCT-domain downscaling) for large images.

GPU decoding (``gpu`` mode) is :mod:`clipbatch.preprocess.device`.

What "the model's own transform" does is data, :class:`ImagePreprocess`, read from the
model itself (clip's ``_transform``, open_clip's ``PreprocessCfg``, a transformers image
processor): the size, how the image is resized (shortest side, longest side, or squashed),
the interpolation, the centre crop and where it rounds, the mean and std, and which
resampler the family's own reference uses (PIL, or torch's uint8 antialiased kernel, as
transformers' torchvision image processors do). ``exact`` follows that reference;
``fast`` and ``gpu`` use torch's kernels with the same geometry.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

log = logging.getLogger(__name__)

# OpenAI CLIP's normalisation (clip's _transform, open_clip's OPENAI_DATASET_MEAN/STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("shortest", "longest", "squash")
INTERPOLATIONS = ("bicubic", "bilinear")
CROP_ROUNDINGS = ("round", "floor")
RESAMPLERS = ("pil", "torch")


def channel_values(value: Any) -> tuple[float, float, float]:
    """A per-channel mean or std as three floats (configs give one number or three)."""
    if isinstance(value, int | float):
        return (float(value),) * 3  # type: ignore[return-value]
    a, b, c = (float(v) for v in value)
    return a, b, c


@dataclass(frozen=True)
class ImagePreprocess:
    """A model family's image preprocessing, as data: resize, pad/crop, then normalise.

    - ``size``: (height, width) the model takes.
    - ``resize_mode``: ``shortest`` (the short side to ``shortest_edge``, the long side
      truncated, as torchvision's ``Resize(int)``; without ``shortest_edge``, keep the ratio
      against ``size`` and round, as open_clip's ``ResizeKeepRatio``), ``longest`` (the long
      side to fit ``size``, rounded; then padded with ``fill``), or ``squash`` (to
      ``squash_size``, default ``size``, ignoring the aspect ratio).
    - ``interpolation``: ``bicubic`` or ``bilinear`` (antialiased, as PIL always is).
    - ``crop``: centre-crop to ``size`` after resizing, padding with ``fill`` first where
      the image is smaller. ``crop_rounding`` is where an odd margin goes: ``round``
      (torchvision, open_clip) or ``floor`` (transformers).
    - ``mean``/``std``: Normalize's, on pixels scaled to [0, 1].
    - ``resampler``: what the family's own reference resizes with, ``pil`` or ``torch``
      (uint8, antialiased); ``exact`` mode uses the same.
    """

    size: tuple[int, int]
    resize_mode: str = "shortest"
    shortest_edge: int | None = None
    squash_size: tuple[int, int] | None = None
    interpolation: str = "bicubic"
    crop: bool = True
    crop_rounding: str = "round"
    fill: int = 0
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resampler: str = "pil"

    def __post_init__(self) -> None:
        checks = [
            (self.resize_mode in RESIZE_MODES, f"resize mode {self.resize_mode!r}"),
            (self.interpolation in INTERPOLATIONS, f"interpolation {self.interpolation!r}"),
            (self.crop_rounding in CROP_ROUNDINGS, f"crop rounding {self.crop_rounding!r}"),
            (self.resampler in RESAMPLERS, f"resampler {self.resampler!r}"),
            (len(self.size) == 2 and min(self.size) > 0, f"size {self.size!r}"),
            (len(self.mean) == 3 and len(self.std) == 3, "mean/std must have 3 channels"),
            (
                self.crop
                or (self.resize_mode == "squash" and self.squash_size in (None, self.size)),
                "only 'squash' to the model's size gives a fixed size uncropped",
            ),
        ]
        for ok, what in checks:
            if not ok:
                raise ValueError(f"unsupported image preprocessing: {what}")

    @classmethod
    def clip(cls, n_px: int) -> ImagePreprocess:
        """OpenAI CLIP's: Resize(n_px, bicubic) -> CenterCrop(n_px) -> CLIP mean/std, PIL."""
        return cls(size=(n_px, n_px), shortest_edge=n_px)

    @property
    def n_px(self) -> int:
        """The largest output side (what JPEG draft decoding must stay above)."""
        return max(self.size)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, before any pad or crop."""
        target_h, target_w = self.size
        if self.resize_mode == "squash":
            squash_h, squash_w = self.squash_size or self.size
            return squash_w, squash_h
        if self.resize_mode == "shortest" and self.shortest_edge is not None:
            return resized_size(width, height, self.shortest_edge)
        ratio_h, ratio_w = height / target_h, width / target_w
        ratio = max(ratio_h, ratio_w) if self.resize_mode == "longest" else min(ratio_h, ratio_w)
        return round(width / ratio), round(height / ratio)

    def padding(self, width: int, height: int) -> list[int] | None:
        """Left, top, right, bottom padding before the crop, or None when none is needed."""
        target_h, target_w = self.size
        if not self.crop or (target_w <= width and target_h <= height):
            return None
        pad_w, pad_h = max(target_w - width, 0), max(target_h - height, 0)
        return [pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2]

    def crop_offsets(self, width: int, height: int) -> tuple[int, int]:
        """(left, top) of the centre crop on a width x height (already padded) image."""
        target_h, target_w = self.size
        if self.crop_rounding == "round":
            return int(round((width - target_w) / 2.0)), int(round((height - target_h) / 2.0))
        return int((width - target_w) / 2.0), int((height - target_h) / 2.0)

    def describe(self) -> dict[str, Any]:
        """For file metadata and lineage (JSON types)."""
        out = asdict(self)
        out["size"] = list(self.size)
        if self.squash_size is not None:
            out["squash_size"] = list(self.squash_size)
        out["mean"] = list(self.mean)
        out["std"] = list(self.std)
        return out


_PIL_INTERPOLATION = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
}


def resized_size(width: int, height: int, n_px: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(n_px)``: short side to n_px, long side truncated."""
    if width <= height:
        return n_px, int(n_px * height / width)
    return int(n_px * width / height), n_px


def crop_offsets(width: int, height: int, n_px: int) -> tuple[int, int]:
    """(left, top) of torchvision's ``CenterCrop(n_px)`` on a width x height image."""
    return int(round((width - n_px) / 2.0)), int(round((height - n_px) / 2.0))


def resize_crop(
    rgb: Image.Image, n_px: int, mode: str = "exact", geometry: ImagePreprocess | None = None
) -> np.ndarray:
    """uint8 HxWx3 at the model's size from an RGB PIL image, by ``mode`` (module docstring).

    ``geometry`` is the model family's preprocessing; None is OpenAI CLIP's at ``n_px``.
    """
    g = geometry or ImagePreprocess.clip(n_px)
    if mode == "exact" and g.resampler == "pil":
        width, height = rgb.size
        new_w, new_h = g.resized_size(width, height)
        resized = TF.resize(rgb, [new_h, new_w], interpolation=_PIL_INTERPOLATION[g.interpolation])
        return np.asarray(_pad_crop_pil(resized, g), dtype=np.uint8)
    if mode in ("exact", "fast"):
        # A writable copy: torch does not take read-only numpy buffers without a warning.
        return resize_crop_array(np.array(rgb, dtype=np.uint8), n_px, g)
    raise ValueError(f"unknown preprocessing mode {mode!r}; expected 'exact' or 'fast'")


def _pad_crop_pil(img: Image.Image, g: ImagePreprocess) -> Image.Image:
    if not g.crop:
        return img
    padding = g.padding(*img.size)
    if padding is not None:
        img = TF.pad(img, padding, fill=g.fill)
    left, top = g.crop_offsets(*img.size)
    return TF.crop(img, top, left, g.size[0], g.size[1])


def resize_crop_array(
    pixels: np.ndarray, n_px: int, geometry: ImagePreprocess | None = None
) -> np.ndarray:
    """The torch resize and crop of a uint8 HxWx3 array (CPU): ``fast`` mode."""
    t = torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0)
    return resize_crop_tensor(t, n_px, geometry)[0].permute(1, 2, 0).contiguous().numpy()


def resize_crop_tensor(
    t: torch.Tensor, n_px: int, geometry: ImagePreprocess | None = None
) -> torch.Tensor:
    """uint8 1x3xHxW (any device) -> uint8 1x3x(size), as the family's resize + crop.

    ``geometry`` None is OpenAI CLIP's (torchvision Resize(n_px) + CenterCrop(n_px)).
    """
    g = geometry or ImagePreprocess.clip(n_px)
    height, width = int(t.shape[-2]), int(t.shape[-1])
    new_w, new_h = g.resized_size(width, height)
    if (new_w, new_h) != (width, height):
        if t.device.type == "cpu":
            # Channels-last uint8 takes torch's vectorised antialiased path on the CPU.
            t = F.interpolate(
                t.contiguous(memory_format=torch.channels_last),
                size=(new_h, new_w),
                mode=g.interpolation,
                antialias=True,
                align_corners=False,
            )
        else:
            t = resize_via_float(t, new_h, new_w, g.interpolation)
    if not g.crop:
        return t
    padding = g.padding(new_w, new_h)
    if padding is not None:
        left, top, right, bottom = padding
        t = F.pad(t, (left, right, top, bottom), value=g.fill)
        new_w, new_h = new_w + left + right, new_h + top + bottom
    left, top = g.crop_offsets(new_w, new_h)
    target_h, target_w = g.size
    return t[..., top : top + target_h, left : left + target_w]


def resize_via_float(
    t: torch.Tensor, height: int, width: int, mode: str = "bicubic"
) -> torch.Tensor:
    """Antialiased bicubic (or bilinear) resize of uint8 NCHW through float32, back to uint8.

    CUDA's interpolation kernels take floating point only (torch's uint8 path is
    CPU-only); the float path uses the same PIL-like kernel, and bicubic overshoot is
    clamped as PIL clamps it.
    """
    out = F.interpolate(
        t.float(), size=(height, width), mode=mode, antialias=True, align_corners=False
    )
    return out.round_().clamp_(0, 255).to(torch.uint8)
