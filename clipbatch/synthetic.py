"""Synthetic captioned images: shapes x colours x sizes x positions x backgrounds.

Used by ``clipbatch demo`` (an img2dataset-style WebDataset written locally), by the
tiny model's training script, and by the tests. Seeded and deterministic.
"""

from __future__ import annotations

import io
import json
import random
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS = ("plain", "striped", "noisy", "gradient")


@dataclass(frozen=True)
class SceneSpec:
    shape: str
    colour: str
    size: str
    position: str
    background: str
    bg_colour: str

    def caption(self) -> str:
        where = "in the center" if self.position == "center" else f"on the {self.position}"
        return f"a {self.size} {self.colour} {self.shape} {where} of a {self.background} {self.bg_colour} background"

    def partial_caption(self, rng: random.Random) -> str:
        """A shorter description that omits some attributes ("a red circle", "a star on the left").

        Training on these as well as on full captions teaches the model what each word
        means on its own, so short queries and zero-shot prompts work.
        """
        size = f"{self.size} " if rng.random() < 0.4 else ""
        colour = f"{self.colour} " if rng.random() < 0.75 else ""
        shape = self.shape if (not colour or rng.random() < 0.75) else "shape"
        text = f"a {size}{colour}{shape}"
        where = rng.random() < 0.4
        if where:
            text += " in the center" if self.position == "center" else f" on the {self.position}"
        if rng.random() < 0.3:
            text += f" {'of' if where else 'on'} a {self.background} {self.bg_colour} background"
        return text


def colour_prompt(colour: str) -> str:
    """The zero-shot prompt for a colour class."""
    return f"a {colour} shape"


def shape_prompt(shape: str) -> str:
    """The zero-shot prompt for a shape class."""
    return f"a {shape}"


_CAPTION = re.compile(r"^a (?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) ")


def parse_caption(caption: str) -> dict[str, str]:
    """Shape, colour and size from a full :meth:`SceneSpec.caption`; raises ValueError otherwise."""
    m = _CAPTION.match(caption)
    if m is None or m["shape"] not in SHAPES or m["colour"] not in COLOURS:
        raise ValueError(f"not a synthetic scene caption: {caption!r}")
    return m.groupdict()


def random_spec(rng: random.Random) -> SceneSpec:
    colour = rng.choice(list(COLOURS))
    bg = rng.choice([c for c in COLOURS if c != colour])
    return SceneSpec(
        shape=rng.choice(SHAPES),
        colour=colour,
        size=rng.choice(SIZES),
        position=rng.choice(POSITIONS),
        background=rng.choice(BACKGROUNDS),
        bg_colour=bg,
    )


def render(spec: SceneSpec, size: int, rng: random.Random) -> Image.Image:
    """A photo-like picture of ``spec``: textured background, jitter, blur and sensor noise."""
    nrng = np.random.default_rng(rng.getrandbits(32))
    bg = np.array(COLOURS[spec.bg_colour], np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    if spec.background == "striped":
        period = rng.uniform(0.08, 0.16)
        stripes = ((xx + yy * rng.uniform(-0.5, 0.5)) / period).astype(int) % 2
        canvas = bg * (0.65 + 0.35 * stripes[..., None])
    elif spec.background == "gradient":
        canvas = bg * (0.45 + 0.55 * xx[..., None])
    elif spec.background == "noisy":
        canvas = bg * (0.7 + 0.3 * nrng.random((size, size, 1), dtype=np.float32))
    else:
        canvas = np.broadcast_to(bg, (size, size, 3)).copy()
    img = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    frac = rng.uniform(0.18, 0.26) if spec.size == "small" else rng.uniform(0.42, 0.55)
    r = frac * size / 2
    centres = {
        "left": (0.27, 0.5),
        "right": (0.73, 0.5),
        "top": (0.5, 0.27),
        "bottom": (0.5, 0.73),
        "center": (0.5, 0.5),
    }
    cx, cy = centres[spec.position]
    cx = (cx + rng.uniform(-0.05, 0.05)) * size
    cy = (cy + rng.uniform(-0.05, 0.05)) * size
    colour = tuple(int(np.clip(c + rng.uniform(-20, 20), 0, 255)) for c in COLOURS[spec.colour])
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif spec.shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif spec.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        pts = []
        for i in range(10):
            ang = np.pi / 2 + i * np.pi / 5
            rad = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rad * np.cos(ang), cy - rad * np.sin(ang)))
        draw.polygon(pts, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 1.0)))
    arr = np.asarray(img, np.float32) + nrng.normal(0, 6, (size, size, 3))
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_webdataset(
    dest: str | Path, shards: int = 3, per_shard: int = 64, seed: int = 0, size: int = 128
) -> list[Path]:
    """Write img2dataset-style shards ``00000.tar`` ... with .jpg/.txt/.json members.

    Keys follow img2dataset: shard id x 10^4 + index, zero-padded to 9 digits.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for s in range(shards):
        path = dest / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s * 10_000 + i:09d}"
                spec = random_spec(rng)
                img = render(spec, size, rng)
                meta = {
                    "key": key,
                    "caption": spec.caption(),
                    "width": size,
                    "height": size,
                    "url": f"https://example.invalid/{key}.jpg",
                    **spec.__dict__,
                }
                _add(tar, f"{key}.jpg", jpeg_bytes(img))
                _add(tar, f"{key}.txt", spec.caption().encode())
                _add(tar, f"{key}.json", json.dumps(meta).encode())
        paths.append(path)
    return paths
