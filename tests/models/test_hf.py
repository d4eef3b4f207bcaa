"""transformers models (CLIPModel, SiglipModel) equal their own reference calls:
``get_image_features(**processor(images=...))`` and ``get_text_features(**processor(text=...))``,
loaded from ``save_pretrained`` folders the way users load them.

Also: SigLIP pads to 64 and is never trimmed; CLIP's pad-to-longest equals full padding;
PIL-backed processors (transformers 4's default) are matched too; swapping SigLIP's
preprocessing for CLIP's fails the comparison; the NaFlex Siglip2Model is refused.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from clipbatch.config import ModelConfig
from clipbatch.encode.encoder import ClipEncoder
from clipbatch.errors import ConfigError
from clipbatch.models.base import TokenBatch
from clipbatch.models.hf import image_preprocess
from clipbatch.models.loading import LoadedModel, load_model, resolve_checkpoint
from clipbatch.preprocess.decode import DecodeOptions, decode_to_pixels
from clipbatch.preprocess.resize import CLIP_MEAN, CLIP_STD, ImagePreprocess
from tests import model_fixtures as mf
from tests.models.netwatch import network_attempts

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {
        "clip": mf.write_hf_clip_dir(root / "clip"),
        "siglip": mf.write_hf_siglip_dir(root / "siglip"),
    }


def load(folder: Path, **kwargs: object) -> LoadedModel:
    return load_model(ModelConfig(name=f"hf:{folder}", **kwargs), "cpu")


def feats(out: object) -> np.ndarray:
    t = out if isinstance(out, torch.Tensor) else out.pooler_output  # transformers 4 / 5
    return t.numpy()


def reference(
    folder: Path, data: list[bytes], captions: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """transformers' own calls, on a model and processor loaded independently of clipbatch."""
    model = transformers.AutoModel.from_pretrained(folder).eval()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    with torch.no_grad():
        image = feats(
            model.get_image_features(**processor(images=mf.pil_images(data), return_tensors="pt"))
        )
        text_inputs = processor(
            text=captions, padding="max_length", truncation=True, return_tensors="pt"
        )
        text = feats(model.get_text_features(**text_inputs))
    return image, text


def exact_pixels(loaded: LoadedModel, data: list[bytes], geometry: ImagePreprocess | None = None):
    opts = DecodeOptions(
        loaded.input_resolution, "exact", geometry=geometry or loaded.image_preprocess
    )
    return np.stack([decode_to_pixels(d, opts)[0] for d in data])


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_exact_mode_equals_transformers_own_calls(folders: dict[str, Path], kind: str) -> None:
    folder = folders[kind]
    loaded = load(folder)
    assert (
        loaded.family == "hf"
        and loaded.checkpoint.arch == {"clip": "CLIPModel", "siglip": "SiglipModel"}[kind]
    )
    enc = ClipEncoder(loaded, batch_size=4)
    data = mf.images()
    ref_img, ref_txt = reference(folder, data, mf.CAPTIONS)
    ours_img = enc.encode_images(exact_pixels(loaded, data))
    ours_txt, truncated = enc.encode_texts(mf.CAPTIONS)
    assert mf.cosines(ours_img, ref_img).min() >= 0.9999
    assert mf.cosines(ours_txt, ref_txt).min() >= 0.9999
    assert truncated == [False, False, False, False, True]
    fast_opts = DecodeOptions(loaded.input_resolution, "fast", geometry=loaded.image_preprocess)
    fast = np.stack([decode_to_pixels(d, fast_opts)[0] for d in data])
    assert mf.cosines(enc.encode_images(fast), ref_img).min() >= 0.999
    # The gpu mode's batched decode path (torchvision's CPU decoder here), same geometry.
    from clipbatch.preprocess.device import decode_jpegs_on_device

    geometry = loaded.image_preprocess
    decoded = decode_jpegs_on_device(data, geometry.n_px, "cpu", lambda i: None, geometry)
    gpu_path = torch.stack([t.permute(1, 2, 0) for t in decoded])
    assert gpu_path.shape[1:3] == geometry.size
    assert mf.cosines(enc.encode_images(gpu_path), ref_img).min() >= 0.999


def test_siglip_pads_to_64_and_clip_trims_exactly(folders: dict[str, Path]) -> None:
    siglip = load(folders["siglip"])
    enc = ClipEncoder(siglip, batch_size=8)
    assert not siglip.backend.trims_text and enc.context_tokens == 64
    tokens, _ = enc.tokenize(["a red circle", "a"])
    assert isinstance(tokens, TokenBatch) and tokens.input_ids.shape == (2, 64)
    # A lower caption limit truncates there and still pads to 64.
    tokens16, truncated = ClipEncoder(siglip, 8, context_tokens=16).tokenize(["a", "red " * 40])
    assert tokens16.input_ids.shape == (2, 64) and truncated == [False, True]

    clip_like = load(folders["clip"])
    assert clip_like.backend.trims_text
    processor = transformers.AutoProcessor.from_pretrained(folders["clip"])
    short = mf.CAPTIONS[:3]
    longest = processor(text=short, padding=True, return_tensors="pt")
    full = processor(text=short, padding="max_length", return_tensors="pt")
    assert longest["input_ids"].shape[1] < full["input_ids"].shape[1] == 77
    with torch.no_grad():
        trimmed = feats(clip_like.model.get_text_features(**longest))
        padded = feats(clip_like.model.get_text_features(**full))
        ours, _ = ClipEncoder(clip_like, 8).encode_texts(short)
    np.testing.assert_allclose(trimmed, padded, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours, padded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_pil_backed_processors_are_matched_too(folders: dict[str, Path], kind: str) -> None:
    """transformers 4's default image processors resize with PIL and crop at floor offsets."""
    pil_cls = {"clip": "CLIPImageProcessorPil", "siglip": "SiglipImageProcessorPil"}[kind]
    slow_cls = getattr(transformers, pil_cls, None)
    if slow_cls is None:  # transformers 4: the plain class is the PIL one
        slow_cls = getattr(
            transformers, {"clip": "CLIPImageProcessor", "siglip": "SiglipImageProcessor"}[kind]
        )
    ip = slow_cls.from_pretrained(folders[kind])
    geometry = image_preprocess(ip)
    assert geometry.resampler == "pil" and geometry.crop_rounding == "floor"
    data = mf.images()
    ref = ip(images=mf.pil_images(data), return_tensors="pt")["pixel_values"]
    opts = DecodeOptions(geometry.n_px, "exact", geometry=geometry)
    pixels = torch.from_numpy(np.stack([decode_to_pixels(d, opts)[0] for d in data]))
    ours = (
        pixels.permute(0, 3, 1, 2).float() / 255 - torch.tensor(geometry.mean).view(1, 3, 1, 1)
    ) / torch.tensor(geometry.std).view(1, 3, 1, 1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)  # the same pixels; float rounding only


def test_swapping_siglips_preprocessing_for_clips_fails_the_comparison(
    folders: dict[str, Path],
) -> None:
    folder = folders["siglip"]
    loaded = load(folder)
    data = mf.images()
    ref_img, _ = reference(folder, data, ["x"])
    own = loaded.image_preprocess
    assert (own.resize_mode, own.crop, own.mean) == ("squash", False, (0.5, 0.5, 0.5))
    swaps = {
        "mean/std": dataclasses.replace(own, mean=CLIP_MEAN, std=CLIP_STD),
        "resize": dataclasses.replace(
            own, resize_mode="shortest", shortest_edge=own.size[0], crop=True
        ),
        "all": ImagePreprocess.clip(own.size[0]),
    }
    for what, geometry in [*swaps.items(), ("own", own)]:
        pixels = torch.from_numpy(exact_pixels(loaded, data, geometry)).permute(0, 3, 1, 2)
        mean = torch.tensor(geometry.mean).view(1, 3, 1, 1)
        std = torch.tensor(geometry.std).view(1, 3, 1, 1)
        with torch.no_grad():
            emb = loaded.backend.encode_image((pixels.float() / 255 - mean) / std).numpy()
        worst = mf.cosines(emb, ref_img).min()
        assert (worst >= 0.9999) == (what == "own"), (what, worst)


def test_identity_revision_and_refusals(folders: dict[str, Path], tmp_path: Path) -> None:
    ckpt = resolve_checkpoint(ModelConfig(name=f"hf:{folders['siglip']}"))
    identity = ckpt.fingerprint_identity()
    assert identity == {
        "family": "hf",
        "arch": "SiglipModel",
        "tag": None,
        "revision": None,
        "config_sha256": ckpt.config_sha256,
    }
    assert ckpt.context_length == 64 and len(ckpt.sha256) == 64
    naflex = mf.write_hf_siglip2_naflex_dir(tmp_path / "naflex")
    with pytest.raises(ConfigError, match="NaFlex.*Siglip2Model.*SiglipModel"):
        resolve_checkpoint(ModelConfig(name=f"hf:{naflex}"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ConfigError, match="model type 'bert' is not supported"):
        resolve_checkpoint(ModelConfig(name=f"hf:{tmp_path / 'other'}"))
    with pytest.raises(ConfigError, match="is not a folder"):
        resolve_checkpoint(ModelConfig(name=f"hf:{tmp_path / 'missing'}"))


def test_hub_names_fail_offline_without_touching_the_network(folders: dict[str, Path]) -> None:
    """Offline means no connection and no name lookup is even attempted (pytest-socket
    would refuse one; this shows none was tried), while local folders still load."""
    with network_attempts() as attempts:
        with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
            resolve_checkpoint(ModelConfig(name="hf:google/siglip-base-patch16-224"))
        loaded = load(folders["siglip"])  # with the hub offline, a folder loads as ever
    assert attempts == []
    assert loaded.family == "hf"


def test_sharded_weights_load_and_hash_every_shard(
    folders: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    sharded = tmp_path / "sharded"
    shutil.copytree(folders["clip"], sharded)
    (sharded / "model.safetensors").unlink()
    transformers.CLIPModel.from_pretrained(folders["clip"]).save_pretrained(
        sharded, max_shard_size="1MB"
    )
    assert not (sharded / "model.safetensors").exists()
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    ckpt = resolve_checkpoint(ModelConfig(name=f"hf:{sharded}"))
    single = resolve_checkpoint(ModelConfig(name=f"hf:{folders['clip']}"))
    assert ckpt.sha256 != single.sha256 and len(ckpt.sha256) == 64
    ours, _ = ClipEncoder(load(sharded), 8).encode_texts(mf.CAPTIONS[:2])
    theirs, _ = ClipEncoder(load(folders["clip"]), 8).encode_texts(mf.CAPTIONS[:2])
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    # Changing any shard changes the checksum.
    shards[0].write_bytes(shards[0].read_bytes()[:-1] + b"\0")
    assert resolve_checkpoint(ModelConfig(name=f"hf:{sharded}")).sha256 != ckpt.sha256
