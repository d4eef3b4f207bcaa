"""The synthetic training and held-out sets, rendered once and kept in memory.

Images go through the same path as the pipeline's: rendered, saved as JPEG, decoded
and resized by :func:`clipbatch.preprocess.decode.decode_to_pixels` (the model's own Resize and
CenterCrop), so the model trains on exactly the pixels it will later be given.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import numpy as np

from clipbatch.preprocess.decode import DecodeOptions, decode_to_pixels
from clipbatch.synthetic import SHAPES, SceneSpec, jpeg_bytes, random_spec, render

# Rendered sizes vary so the model sees the bicubic downscale the pipeline applies.
RENDER_SIZES = (64, 80, 96, 128)


@dataclass
class SceneSet:
    specs: list[SceneSpec]
    pixels: np.ndarray  # uint8 N x n_px x n_px x 3

    @property
    def captions(self) -> list[str]:
        return [s.caption() for s in self.specs]


def make_scene_set(n: int, seed: int, n_px: int, shape_groups: bool = False) -> SceneSet:
    """``n`` rendered scenes. With ``shape_groups``, consecutive runs of len(SHAPES) scenes
    share every attribute but the shape (each rendered with its own jitter and noise)."""
    rng = random.Random(seed)
    opts = DecodeOptions(n_px=n_px)
    specs: list[SceneSpec] = []
    pixels = np.empty((n, n_px, n_px, 3), np.uint8)
    base: SceneSpec | None = None
    for i in range(n):
        if shape_groups:
            if base is None or i % len(SHAPES) == 0:
                base = random_spec(rng)
            spec = dataclasses.replace(base, shape=SHAPES[i % len(SHAPES)])
        else:
            spec = random_spec(rng)
        img = render(spec, rng.choice(RENDER_SIZES), rng)
        pixels[i] = decode_to_pixels(jpeg_bytes(img, quality=rng.randint(75, 95)), opts)[0]
        specs.append(spec)
    return SceneSet(specs=specs, pixels=pixels)
