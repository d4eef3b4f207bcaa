"""Encoder identities: trimmed text equals stock encode_text; batched normalisation equals the reference."""

from __future__ import annotations

import io
import random

import clip
import numpy as np
import torch
from PIL import Image

from clipbatch.config import ModelConfig
from clipbatch.encode.encoder import ClipEncoder
from clipbatch.models.loading import load_model
from clipbatch.models.openai import encode_text_trimmed
from clipbatch.preprocess.decode import DecodeOptions, decode_to_pixels
from clipbatch.synthetic import jpeg_bytes, random_spec, render


def tiny():
    return load_model(ModelConfig(name="tiny"), "cpu")


def test_trimmed_text_equals_stock_encode_text():
    loaded = tiny()
    captions = [
        "a red circle",
        "a small blue square on the left of a striped white background",
        "many words " * 60,
        "",
    ]
    stock_tokens = clip.tokenize(captions, truncate=True)
    with torch.no_grad():
        stock = loaded.model.encode_text(stock_tokens)
        enc = ClipEncoder(loaded, batch_size=4)
        tokens, truncated = enc.tokenize(captions)
        assert tokens.shape[1] == 77  # the long caption sets the width
        # The trimmed batch is exactly the stock tokens cut at the longest caption.
        assert torch.equal(tokens, stock_tokens[:, : tokens.shape[1]])
        ours = encode_text_trimmed(loaded.model, tokens)
    assert truncated == [False, False, True, False]
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    short = encode_text_trimmed(loaded.model, clip.tokenize(captions[:2])[:, :20])
    torch.testing.assert_close(short, stock[:2], rtol=1e-5, atol=1e-5)


def test_uint8_path_is_bit_identical_to_reference_preprocess():
    loaded = tiny()
    enc = ClipEncoder(loaded, batch_size=4)
    rng = random.Random(3)
    opts = DecodeOptions(n_px=loaded.input_resolution)
    for w, h in [(97, 64), (64, 130), (200, 150)]:
        img = render(random_spec(rng), max(w, h), rng).resize((w, h))
        data = jpeg_bytes(img)
        pixels, _, _ = decode_to_pixels(data, opts)
        ours = enc.pixels_to_input(pixels[None])
        ref = loaded.preprocess(Image.open(io.BytesIO(data))).unsqueeze(0)
        assert torch.equal(ours, ref)
        assert np.asarray(pixels).dtype == np.uint8
