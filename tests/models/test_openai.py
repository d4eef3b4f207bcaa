"""OpenAI-format models behind the backend interface: unchanged, and unchanged in fingerprints.

``openai:X`` is ``X``; every OpenAI-format model has no fingerprint identity (so tables
written before model families existed are still skipped); a random ViT saved as an
OpenAI state dict equals ``clip.load``'s own calls.
"""

from __future__ import annotations

from pathlib import Path

import clip
import numpy as np
import pytest
import torch

from clipbatch.config import ModelConfig
from clipbatch.encode.encoder import ClipEncoder
from clipbatch.models.loading import load_model, resolve_checkpoint
from clipbatch.preprocess.decode import DecodeOptions, decode_to_pixels
from clipbatch.preprocess.resize import ImagePreprocess
from tests import model_fixtures as mf

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mf.write_openai_checkpoint(tmp_path_factory.mktemp("openai") / "vit.pt")


def test_prefixed_and_bare_names_are_one_model(checkpoint: Path) -> None:
    for bare in ("tiny", str(checkpoint)):
        plain = resolve_checkpoint(ModelConfig(name=bare))
        prefixed = resolve_checkpoint(ModelConfig(name=f"openai:{bare}"))
        assert prefixed == plain  # same sha256, same display name, same everything
        assert plain.fingerprint_identity() is None and plain.family == "openai"
    tiny = resolve_checkpoint(ModelConfig(name="tiny"))
    assert tiny.context_length == 77 and tiny.identity()["family"] == "openai"


def test_openai_checkpoint_equals_clip_load(checkpoint: Path) -> None:
    loaded = load_model(ModelConfig(name=f"openai:{checkpoint}"), "cpu")
    assert loaded.image_preprocess == ImagePreprocess.clip(mf.N_PX)
    model, preprocess = clip.load(str(checkpoint), device="cpu", jit=False)
    model = model.float().eval()
    data = mf.images()
    enc = ClipEncoder(loaded, batch_size=4)
    assert enc.context_tokens == 77
    opts = DecodeOptions(loaded.input_resolution, "exact", geometry=loaded.image_preprocess)
    pixels = np.stack([decode_to_pixels(d, opts)[0] for d in data])
    with torch.no_grad():
        ref_in = torch.stack([preprocess(img) for img in mf.pil_images(data)])
        assert torch.equal(enc.pixels_to_input(pixels), ref_in)  # bit for bit, as before
        ref_img = model.encode_image(ref_in).numpy()
        ref_txt = model.encode_text(clip.tokenize(mf.CAPTIONS, truncate=True)).numpy()
    np.testing.assert_array_equal(enc.encode_images(pixels), ref_img)
    ours_txt, truncated = enc.encode_texts(mf.CAPTIONS)
    assert mf.cosines(ours_txt, ref_txt).min() >= 0.9999
    assert truncated == [False, False, False, False, True]


def test_caption_limit_defaults_to_and_is_clamped_to_the_context() -> None:
    loaded = load_model(ModelConfig(name="tiny"), "cpu")
    assert ClipEncoder(loaded, 4).context_tokens == 77
    assert ClipEncoder(loaded, 4, context_tokens=None).context_tokens == 77
    assert ClipEncoder(loaded, 4, context_tokens=500).context_tokens == 77
    enc = ClipEncoder(loaded, 4, context_tokens=16)
    tokens, truncated = enc.tokenize(["word " * 30, "a red circle"])
    assert tokens.shape[1] == 16 and truncated == [True, False]
    assert enc.text_metadata()["max_caption_tokens"] == 16
    assert ModelConfig().max_caption_tokens is None  # the family's own context length
