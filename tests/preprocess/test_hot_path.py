"""The hot path: exact preprocessing is bit-identical to clip's, fast stays within 0.9999,
OOM halving and the batch-size probe, the device JPEG decode's fallbacks, the overlapped
pipeline's output. Speed is measured in bench/, never asserted here."""

from __future__ import annotations

import io
import random

import clip
import clip.model
import numpy as np
import pytest
import torch
from clip.clip import _transform
from PIL import Image

from bench.common import VIT_B32  # the one definition of the random ViT-B/32 shape
from clipbatch.config import ModelConfig
from clipbatch.encode.encoder import ClipEncoder, probe_batch_size
from clipbatch.models.loading import LoadedModel, ResolvedCheckpoint, load_model
from clipbatch.preprocess.decode import DecodeOptions, decode_to_pixels
from clipbatch.preprocess.device import decode_jpegs_on_device
from clipbatch.preprocess.resize import resize_crop_array
from clipbatch.synthetic import jpeg_bytes, random_spec, render


def images(sizes: list[tuple[int, int]], seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [jpeg_bytes(render(random_spec(rng), max(w, h), rng).resize((w, h))) for w, h in sizes]


# Landscape, portrait, upscaled, and large enough for JPEG draft decoding in fast mode.
SIZES = [(97, 64), (64, 130), (300, 220), (512, 384), (900, 1200)]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model(ModelConfig(name="tiny"), "cpu")


@pytest.fixture(scope="module")
def vit_b32() -> LoadedModel:
    torch.manual_seed(0)
    model = clip.model.CLIP(**VIT_B32).eval()
    return LoadedModel(
        model=model,
        preprocess=_transform(224),
        checkpoint=ResolvedCheckpoint("random", "0" * 64, "random ViT-B/32"),
        device="cpu",
        dtype=torch.float32,
    )


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def reference(loaded: LoadedModel, data: list[bytes]) -> tuple[torch.Tensor, np.ndarray]:
    inputs = torch.stack([loaded.preprocess(Image.open(io.BytesIO(d))) for d in data])
    with torch.inference_mode():
        return inputs, loaded.model.encode_image(inputs).float().numpy()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["tiny", "vit_b32"])
def test_exact_mode_is_bit_identical_and_fast_mode_within_fidelity(
    which: str, request: pytest.FixtureRequest
) -> None:
    loaded: LoadedModel = request.getfixturevalue(which)
    enc = ClipEncoder(loaded, batch_size=8)
    n_px = loaded.input_resolution
    data = images(SIZES, seed=1 if which == "tiny" else 2)
    ref_inputs, ref = reference(loaded, data)

    exact = np.stack([decode_to_pixels(d, DecodeOptions(n_px, "exact"))[0] for d in data])
    assert torch.equal(enc.pixels_to_input(exact), ref_inputs)  # the same floats, bit for bit
    ours = enc.encode_images(exact)
    np.testing.assert_array_equal(ours, ref)
    assert cosines(ours, ref).min() >= 0.9999

    fast = np.stack([decode_to_pixels(d, DecodeOptions(n_px, "fast"))[0] for d in data])
    assert fast.dtype == np.uint8 and fast.shape == exact.shape
    # Not identical (rounding, draft decoding), but close per pixel and per embedding.
    assert np.abs(fast.astype(int) - exact.astype(int)).mean() < 2.0
    assert cosines(enc.encode_images(fast), ref).min() >= 0.9999


# Non-square both ways, upscaled, and very thin: where squashing or a wrong crop shows.
GEOMETRY_SIZES = [(97, 64), (64, 130), (300, 220), (10, 500), (500, 37), (224, 224)]


def test_fast_resize_matches_torchvision_geometry() -> None:
    """The fast path is torchvision's Resize(shortest side, bicubic, antialias) followed by
    CenterCrop, on real (non-constant, non-square) pictures: compared with torchvision's
    own transform on the same uint8 tensor and on the PIL image the reference uses."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    n_px = 32
    reference_transform = T.Compose(
        [
            T.Resize(n_px, interpolation=InterpolationMode.BICUBIC, antialias=True),
            T.CenterCrop(n_px),
        ]
    )
    for w, h in GEOMETRY_SIZES:
        [data] = images([(w, h)], seed=w + h)
        pil = Image.open(io.BytesIO(data)).convert("RGB")
        arr = np.array(pil)
        assert arr.std() > 10  # a picture, not a flat colour: geometry errors show
        out = resize_crop_array(arr, n_px)
        assert out.shape == (n_px, n_px, 3) and out.dtype == np.uint8
        via_tensor = reference_transform(torch.from_numpy(arr).permute(2, 0, 1))
        via_pil = np.asarray(reference_transform(pil))
        for name, ref in (("tensor", via_tensor.permute(1, 2, 0).numpy()), ("PIL", via_pil)):
            diff = np.abs(out.astype(int) - ref.astype(int))
            # Fixed-point rounding only: at most 1 level on a few pixels (module docstring).
            assert diff.max() <= 1 and diff.mean() < 0.25, (name, (w, h), diff.max(), diff.mean())
    flat = np.full((50, 80, 3), 77, np.uint8)  # a constant image stays constant
    assert (resize_crop_array(flat, 32) == 77).all()


class _OomAbove(torch.nn.Module):
    """A model whose forward passes fail like a GPU out of memory above ``limit`` rows."""

    def __init__(self, model: torch.nn.Module, limit: int) -> None:
        super().__init__()
        self.inner, self.limit, self.calls = model, limit, []

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the real model's
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.encode_image(x)


@pytest.mark.timeout(60)
def test_oom_halves_the_batch_and_keeps_every_row(tiny: LoadedModel) -> None:
    wrapped = _OomAbove(tiny.model, limit=3)
    flaky = LoadedModel(wrapped, tiny.preprocess, tiny.checkpoint, "cpu", torch.float32)
    data = images([(80, 64)] * 10, seed=4)
    pixels = np.stack([decode_to_pixels(d, DecodeOptions(64))[0] for d in data])
    enc = ClipEncoder(flaky, batch_size=10)
    out = enc.encode_images(pixels)
    np.testing.assert_allclose(out, ClipEncoder(tiny, 10).encode_images(pixels), atol=1e-5)
    assert out.shape == (10, 64) and enc.batch_size == 2  # 10 -> 5 -> 2, and it stays there
    assert wrapped.calls[:3] == [10, 5, 2]


def test_batch_size_probe() -> None:
    def fits_up_to(limit: int):
        def fits(size: int) -> None:
            if size > limit:
                raise torch.OutOfMemoryError("CUDA out of memory")

        return fits

    assert probe_batch_size(fits_up_to(1000), 256, 4096) == 512
    assert probe_batch_size(fits_up_to(100_000), 256, 4096) == 4096
    assert probe_batch_size(fits_up_to(100), 256, 4096) == 64  # even the start did not fit

    def broken(size: int) -> None:
        raise RuntimeError("cuDNN error: not an OOM")

    with pytest.raises(RuntimeError, match="cuDNN"):
        probe_batch_size(broken, 256, 4096)


def test_auto_batch_size_on_the_cpu_keeps_the_start(tiny: LoadedModel) -> None:
    enc = ClipEncoder(tiny, batch_size=32)
    assert enc.find_batch_size(start=64) == 64 and enc.batch_size == 64


def test_device_jpeg_decode_falls_back_per_image() -> None:
    good = images([(120, 90), (90, 120)], seed=5)
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: nvjpeg would not apply it
    buf2 = io.BytesIO()
    Image.open(io.BytesIO(good[0])).save(buf2, format="JPEG", exif=exif)
    corrupt = good[1][: len(good[1]) // 3]
    datas = [good[0], buf.getvalue(), buf2.getvalue(), good[1], corrupt]
    fell_back: list[int] = []
    errors: dict[int, str] = {}

    def fallback(i: int) -> np.ndarray | None:
        fell_back.append(i)
        try:
            return decode_to_pixels(datas[i], DecodeOptions(32, "fast"))[0]
        except Exception as e:  # noqa: BLE001 - the caller records a decode_error row
            errors[i] = f"{type(e).__name__}: {e}"
            return None

    # The CPU device exercises the same code path a CUDA device takes.
    out = decode_jpegs_on_device(datas, 32, "cpu", fallback)
    assert 1 in fell_back and 2 in fell_back and 0 not in fell_back
    # The corrupt JPEG: the device decoder gave it up, the CPU could not decode it either,
    # and it comes back empty (a decode_error row) with the reason, not as pixels.
    assert 4 in fell_back and out[4] is None
    assert list(errors) == [4] and "truncated" in errors[4], errors
    # Through the batch's rows, as the pipeline runs it: the corrupt one alone is a
    # decode_error row, with the reason; the others are ok.
    from clipbatch.preprocess.decode import finish_on_device, prepare
    from clipbatch.records import RawSample

    opts = DecodeOptions(32, "gpu")
    rows = [
        prepare(RawSample(str(i), f"{i}.jpg", image_bytes=d), opts) for i, d in enumerate(datas)
    ]
    finish_on_device(rows, opts, "cpu")
    assert [r.raw.status for r in rows] == ["ok", "ok", "ok", "ok", "decode_error"]
    assert rows[4].pixels is None and "truncated" in (rows[4].raw.error or "").lower()
    for i in (0, 3):
        assert isinstance(out[i], torch.Tensor) and tuple(out[i].shape) == (3, 32, 32)
        cpu = decode_to_pixels(datas[i], DecodeOptions(32, "fast"))[0]
        assert np.abs(out[i].permute(1, 2, 0).numpy().astype(int) - cpu).mean() < 3
    assert isinstance(out[2], np.ndarray) and out[2].shape == (32, 32, 3)


def test_gpu_mode_defers_plain_jpegs_to_the_batched_device_decode() -> None:
    from clipbatch.preprocess.decode import finish_on_device, prepare
    from clipbatch.records import RawSample

    plain = images([(120, 90), (90, 120)], seed=6)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.open(io.BytesIO(plain[0])).save(buf, format="JPEG", exif=exif)
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(plain[1])).convert("CMYK").save(cmyk, format="JPEG")
    png = io.BytesIO()
    Image.new("RGB", (40, 30), (0, 90, 200)).save(png, format="PNG")
    truncated = plain[1][: len(plain[1]) // 3]  # the header parses; the scan data is cut
    datas = [plain[0], buf.getvalue(), cmyk.getvalue(), png.getvalue(), plain[1], truncated]
    opts = DecodeOptions(32, "gpu")
    rows = [
        prepare(RawSample(str(i), f"{i}.jpg", image_bytes=d), opts) for i, d in enumerate(datas)
    ]

    # Plain RGB JPEGs wait for the device; EXIF-rotated, CMYK and PNG decode on the CPU now.
    assert [r.deferred_jpeg is not None for r in rows] == [True, False, False, False, True, True]
    assert all(isinstance(rows[i].pixels, np.ndarray) for i in (1, 2, 3))
    assert (rows[1].width, rows[1].height) == (90, 120)  # orientation applied on the CPU

    finish_on_device(rows, opts, "cpu")  # the CPU device runs the CUDA code path

    assert all(r.deferred_jpeg is None for r in rows)
    for i in (0, 4):
        assert isinstance(rows[i].pixels, torch.Tensor) and tuple(rows[i].pixels.shape) == (
            32,
            32,
            3,
        )
        cpu = decode_to_pixels(datas[i], DecodeOptions(32, "fast"))[0]
        assert np.abs(rows[i].pixels.numpy().astype(int) - cpu).mean() < 3
        assert rows[i].raw.status == "ok"
    assert rows[5].raw.status == "decode_error" and rows[5].pixels is None
    assert rows[5].raw.error and "truncated" in rows[5].raw.error.lower()


def test_float_resize_for_cuda_matches_the_uint8_path() -> None:
    """CUDA resizes through float32 (no uint8 kernels there); run that path on the CPU."""
    from clipbatch.preprocess.resize import resize_via_float

    for w, h in [(300, 220), (97, 64), (64, 130)]:
        [data] = images([(w, h)], seed=w)
        pixels = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
        t = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
        via_uint8 = torch.nn.functional.interpolate(
            t.contiguous(memory_format=torch.channels_last),
            size=(48, 40),
            mode="bicubic",
            antialias=True,
            align_corners=False,
        )
        via_float = resize_via_float(t, 48, 40)
        assert via_float.dtype == torch.uint8 and via_float.shape == via_uint8.shape
        diff = (via_float.int() - via_uint8.int()).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.2
