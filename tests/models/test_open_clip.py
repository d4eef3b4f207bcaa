"""open_clip models equal open_clip's own calls: ``encode_image(preprocess(img))`` and
``encode_text(tokenizer(captions))``, loaded the way users load them (``local-dir:``).

Also: the preprocessing is the model's (a test fails when it is swapped for CLIP's), text
trimming is exact where it is used, SigLIP-shaped towers pad to 64, identities differ
where the model differs, and hub names fail at once offline.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import open_clip
import pytest
import torch

from clipbatch.config import ModelConfig
from clipbatch.encode.encoder import ClipEncoder
from clipbatch.errors import ConfigError
from clipbatch.models.loading import LoadedModel, load_model, resolve_checkpoint
from clipbatch.preprocess.decode import DecodeOptions, decode_to_pixels
from clipbatch.preprocess.resize import CLIP_MEAN, CLIP_STD, ImagePreprocess
from tests import model_fixtures as mf
from tests.faultproxy import FaultProxy
from tests.models.netwatch import network_attempts

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("open_clip")
    out = {
        name: mf.write_open_clip_dir(root / name, preprocess=name)
        for name in mf.OPEN_CLIP_PREPROCESS
    }
    out["siglip"] = mf.write_open_clip_siglip_dir(root / "siglip")
    return out


def name_of(folder: Path) -> str:
    """clipbatch's name for the folder."""
    return f"open_clip:local-dir:{folder}"


def own_name(folder: Path) -> str:
    """open_clip's own name for it."""
    return f"local-dir:{folder}"


def load(folder: Path) -> LoadedModel:
    return load_model(ModelConfig(name=name_of(folder)), "cpu")


def reference(
    folder: Path, data: list[bytes], captions: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """open_clip's own calls, on a model loaded independently of clipbatch."""
    model, preprocess = open_clip.create_model_from_pretrained(own_name(folder))
    tokenizer = open_clip.get_tokenizer(own_name(folder))
    with torch.no_grad():
        inputs = torch.stack([preprocess(img) for img in mf.pil_images(data)])
        return (
            model.eval().encode_image(inputs).numpy(),
            model.encode_text(tokenizer(captions)).numpy(),
        )


def exact_pixels(loaded: LoadedModel, data: list[bytes], geometry: ImagePreprocess | None = None):
    opts = DecodeOptions(
        loaded.input_resolution, "exact", geometry=geometry or loaded.image_preprocess
    )
    return np.stack([decode_to_pixels(d, opts)[0] for d in data])


@pytest.mark.parametrize("variant", [*mf.OPEN_CLIP_PREPROCESS, "siglip"])
def test_exact_mode_equals_open_clips_own_calls(folders: dict[str, Path], variant: str) -> None:
    folder = folders[variant]
    loaded = load(folder)
    assert loaded.family == "open_clip"
    enc = ClipEncoder(loaded, batch_size=4)
    data = mf.images()
    ref_img, ref_txt = reference(folder, data, mf.CAPTIONS)

    ours_img = enc.encode_images(exact_pixels(loaded, data))
    ours_txt, truncated = enc.encode_texts(mf.CAPTIONS)
    assert mf.cosines(ours_img, ref_img).min() >= 0.9999
    assert mf.cosines(ours_txt, ref_txt).min() >= 0.9999
    assert truncated == [False, False, False, False, True]
    # The preprocessing is the config's, read from the model.
    pre = mf.OPEN_CLIP_PREPROCESS["squash" if variant == "siglip" else variant]
    image = loaded.image_preprocess
    assert image.resize_mode == pre["resize_mode"] and image.interpolation == pre["interpolation"]
    assert image.mean == tuple(pre.get("mean", CLIP_MEAN))


def test_swapping_the_preprocessing_for_clips_fails_the_comparison(
    folders: dict[str, Path],
) -> None:
    folder = folders["squash"]  # SigLIP-like: mean/std 0.5, squashed, bilinear
    loaded = load(folder)
    data = mf.images()
    ref_img, _ = reference(folder, data, ["x"])
    own = loaded.image_preprocess
    swaps = {
        "mean/std": dataclasses.replace(own, mean=CLIP_MEAN, std=CLIP_STD),
        "resize": ImagePreprocess(
            size=own.size, shortest_edge=own.size[0], mean=own.mean, std=own.std
        ),
        "all": ImagePreprocess.clip(own.size[0]),
    }
    for what, geometry in swaps.items():
        pixels = torch.from_numpy(exact_pixels(loaded, data, geometry)).permute(0, 3, 1, 2)
        mean = torch.tensor(geometry.mean).view(1, 3, 1, 1)
        std = torch.tensor(geometry.std).view(1, 3, 1, 1)
        with torch.no_grad():
            emb = loaded.backend.encode_image((pixels.float() / 255 - mean) / std).numpy()
        assert mf.cosines(emb, ref_img).min() < 0.9999, what
    # ... while the model's own preprocessing, through the same code, passes.
    pixels = torch.from_numpy(exact_pixels(loaded, data)).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(own.mean).view(1, 3, 1, 1), torch.tensor(own.std).view(1, 3, 1, 1)
    with torch.no_grad():
        emb = loaded.backend.encode_image((pixels - mean) / std).numpy()
    assert mf.cosines(emb, ref_img).min() >= 0.9999


def test_fast_mode_stays_close(folders: dict[str, Path]) -> None:
    for variant in ("shortest", "longest"):
        loaded = load(folders[variant])
        enc = ClipEncoder(loaded, batch_size=8)
        data = mf.images()
        opts = DecodeOptions(loaded.input_resolution, "fast", geometry=loaded.image_preprocess)
        fast = np.stack([decode_to_pixels(d, opts)[0] for d in data])
        ref = enc.encode_images(exact_pixels(loaded, data))
        assert mf.cosines(enc.encode_images(fast), ref).min() >= 0.999, variant


def test_clip_text_trimming_is_exact_and_siglip_pads_to_64(folders: dict[str, Path]) -> None:
    clip_like = load(folders["shortest"])
    enc = ClipEncoder(clip_like, batch_size=8)
    assert clip_like.backend.trims_text
    short = mf.CAPTIONS[:3]
    tokens, _ = enc.tokenize(short)
    assert tokens.shape[1] < 77  # padded to the longest caption only
    stock = open_clip.get_tokenizer(own_name(folders["shortest"]))(short)
    with torch.no_grad():
        torch.testing.assert_close(
            clip_like.backend.encode_text(tokens),
            clip_like.model.encode_text(stock),
            rtol=1e-5,
            atol=1e-5,
        )
    siglip_like = load(folders["siglip"])
    assert not siglip_like.backend.trims_text
    enc = ClipEncoder(siglip_like, batch_size=8)
    assert enc.context_tokens == 64  # the family's context, clamped from the default 77
    tokens, _ = enc.tokenize(short)
    assert tokens.shape == (3, 64)
    # A lower caption limit truncates there, and still pads to the full context.
    enc16 = ClipEncoder(siglip_like, batch_size=8, context_tokens=16)
    tokens16, truncated = enc16.tokenize(["a"] * 2 + ["a b c d e f g h i j k l m n o p q r s"])
    assert tokens16.shape == (3, 64) and truncated == [False, False, True]


def test_identity_fingerprint_and_weights_formats(folders: dict[str, Path], tmp_path: Path) -> None:
    a = resolve_checkpoint(ModelConfig(name=name_of(folders["shortest"])))
    b = resolve_checkpoint(ModelConfig(name=name_of(folders["longest"])))
    identity = a.fingerprint_identity()
    assert identity is not None and identity["family"] == "open_clip"
    assert a.sha256 == b.sha256  # the same weights ...
    assert a.fingerprint_identity() != b.fingerprint_identity()  # ... another preprocessing
    assert a.context_length == 77
    moved = tmp_path / "moved"
    shutil.copytree(folders["shortest"], moved)
    c = resolve_checkpoint(ModelConfig(name=name_of(moved)))
    assert c.fingerprint_identity() == identity and c.sha256 == a.sha256  # a path is not identity
    # The same weights as a PyTorch pickle: loaded with torch.load(weights_only=True).
    pickled = mf.write_open_clip_dir(tmp_path / "bin", preprocess="shortest", weights="bin")
    loaded = load(pickled)
    assert loaded.checkpoint.sha256 != a.sha256  # another file, another checksum
    ours = ClipEncoder(loaded, 8).encode_texts(["a red circle"])[0]
    theirs = ClipEncoder(load(folders["shortest"]), 8).encode_texts(["a red circle"])[0]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="has sha256"):
        resolve_checkpoint(
            ModelConfig(name=name_of(folders["shortest"]), checkpoint_sha256="0" * 64)
        )


def test_bad_folders_and_offline_hub_names_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not a folder"):
        resolve_checkpoint(ModelConfig(name=name_of(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="open_clip_config.json"):
        resolve_checkpoint(ModelConfig(name=name_of(empty)))
    with pytest.raises(ConfigError, match="no pretrained tag 'nope' .*laion2b_s34b_b79k"):
        resolve_checkpoint(ModelConfig(name="open_clip:ViT-B-32:nope"))
    with pytest.raises(ConfigError, match="no architecture"):
        resolve_checkpoint(ModelConfig(name="open_clip:ViT-Q-99:laion"))


def test_hub_names_fail_offline_without_touching_the_network(folders: dict[str, Path]) -> None:
    """Offline means no connection and no name lookup is even attempted (pytest-socket
    would refuse one; this shows none was tried), while local folders still load."""
    with network_attempts() as attempts:
        for name in (
            "open_clip:ViT-B-32:laion2b_s34b_b79k",
            "open_clip:hf-hub:laion/not-cached-here",
        ):
            with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
                resolve_checkpoint(ModelConfig(name=name))
        loaded = load(folders["shortest"])  # with the hub offline, a folder loads as ever
    assert attempts == []
    assert loaded.family == "open_clip"
    # The counter does see a connection when one is made: the check above can fail.
    with network_attempts() as seen, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with socket.create_connection(s.getsockname()):
            pass
    assert [call for call, _ in seen].count("connect") == 1


def object_gets(proxy: FaultProxy, bucket: str, prefix: str) -> list[str]:
    """The keys of the object bodies fetched (GET, not a listing) under ``prefix``."""
    keys = []
    for ex in proxy.recorded():
        parts = urlsplit(ex.target)
        path = unquote(parts.path).lstrip("/")
        if ex.method == "GET" and path.startswith(f"{bucket}/{prefix}") and not parts.query:
            keys.append(path[len(bucket) + 1 :])
    return keys


def test_object_store_folder_is_fetched_once_per_version(
    folders: dict[str, Path], s3_bucket: str, s3_endpoint: str
) -> None:
    from clipbatch.config import StorageOptions
    from tests.conftest import upload_dir

    url = upload_dir(folders["shortest"], s3_bucket, "models/oc", s3_endpoint)
    files = sorted(
        f"models/oc/{p.relative_to(folders['shortest']).as_posix()}"
        for p in folders["shortest"].rglob("*")
        if p.is_file()
    )
    proxy = FaultProxy(s3_endpoint).start()  # counts every request to the store
    try:
        cfg = ModelConfig(
            name=f"open_clip:local-dir:{url}/", storage=StorageOptions(endpoint_url=proxy.url)
        )
        local = resolve_checkpoint(ModelConfig(name=name_of(folders["shortest"])))
        first = resolve_checkpoint(cfg)
        # The first use downloads every object of the folder (a GET that failed and was
        # retried would show twice: the set is what was fetched).
        assert sorted(set(object_gets(proxy, s3_bucket, "models/oc/"))) == files
        assert first.sha256 == local.sha256
        assert (
            first.fingerprint_identity() == local.fingerprint_identity()
        )  # location is not identity
        assert first.source == f"{url}/" and first.display_name == cfg.name
        cached = Path(first.load_arg)
        assert cached.is_dir() and cached != folders["shortest"]
        proxy.clear_exchanges()
        again = resolve_checkpoint(cfg)
        # Unchanged objects: not one object fetched again.
        assert object_gets(proxy, s3_bucket, "models/oc/") == []
        assert again.load_arg == first.load_arg
        # A changed object (new ETag) is fetched again, into a new cache entry.
        import boto3

        config_json = (folders["longest"] / "open_clip_config.json").read_bytes()
        boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").put_object(
            Bucket=s3_bucket, Key="models/oc/open_clip_config.json", Body=config_json
        )
        proxy.clear_exchanges()
        changed = resolve_checkpoint(cfg)
        assert sorted(set(object_gets(proxy, s3_bucket, "models/oc/"))) == files  # new version
        assert changed.load_arg != first.load_arg
        assert changed.fingerprint_identity() != first.fingerprint_identity()
        proxy.clear_exchanges()
        loaded = load_model(cfg, "cpu")
        assert object_gets(proxy, s3_bucket, "models/oc/") == []  # loads from the cache
        assert loaded.image_preprocess.resize_mode == "longest"
    finally:
        proxy.stop()
