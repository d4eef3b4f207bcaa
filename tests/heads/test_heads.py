"""Heads, built with random weights, saved in their published (or converted) format,
loaded as users load them, and compared with a reference forward pass in numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from clipbatch.errors import ConfigError
from clipbatch.heads.base import HeadMismatchError, mlp
from clipbatch.heads.convert_keras import keras_weights_to_state_dict
from clipbatch.heads.laion import KERAS_EPSILON, OPENAI_VIT_L14, AestheticMLP
from clipbatch.heads.registry import list_heads, load_head

RNG = np.random.default_rng(7)


def unit(n: int, d: int) -> np.ndarray:
    x = RNG.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def test_the_aesthetic_predictor_from_its_published_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticMLP().state_dict(), path)  # the published file is this state dict
    head = load_head(f"aesthetic-laion-v2={path}")
    state = torch.load(path, weights_only=True)
    x = unit(20, 768)
    h = x
    for i in (0, 2, 4, 6, 7):  # improved-aesthetic-predictor's Linear layers; dropouts between
        h = h @ state[f"layers.{i}.weight"].numpy().T + state[f"layers.{i}.bias"].numpy()
    assert np.allclose(head.score(x), h[:, 0], atol=1e-5)
    assert head.spec.embed_dim == 768 and head.spec.input == "image"
    assert len(head.sha256) == 64 and head.source == str(path)


@pytest.mark.parametrize(
    ("name", "dims"),
    [("nsfw-laion-b32", [512, 32, 32, 1]), ("nsfw-laion-l14", [768, 64, 512, 256, 1])],
)
def test_the_nsfw_detectors_converted_from_keras_weights(
    tmp_path: Path, name: str, dims: list[int]
) -> None:
    # Keras' get_weights() order: Normalization mean, variance, count; then each Dense's
    # kernel [in, out] and bias.
    mean = RNG.standard_normal(dims[0]).astype(np.float32) * 0.01
    variance = RNG.random(dims[0]).astype(np.float32) * 0.01 + 1e-4
    dense = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        dense += [
            RNG.standard_normal((a, b)).astype(np.float32) / np.sqrt(a),
            RNG.standard_normal(b).astype(np.float32) * 0.1,
        ]
    weights = [mean, variance, np.array(1000, np.int64), *dense]
    path = tmp_path / f"{name}.safetensors"
    save_file(keras_weights_to_state_dict(name, weights), str(path))
    head = load_head(f"{name}={path}")
    x = unit(16, dims[0])
    h = (x - mean) / np.maximum(np.sqrt(variance), KERAS_EPSILON)  # Keras' Normalization
    for i in range(0, len(dense), 2):
        h = h @ dense[i] + dense[i + 1]
        h = relu(h) if i + 2 < len(dense) else sigmoid(h)
    assert np.allclose(head.score(x), h[:, 0], atol=1e-5)


def test_a_keras_head_needs_its_conversion_first() -> None:
    with pytest.raises(ConfigError, match="convert_keras"):
        load_head("nsfw-laion-l14")
    with pytest.raises(ConfigError, match="aesthetic-laion-v2"):
        load_head("no-such-head")
    assert {"aesthetic-laion-v2", "nsfw-laion-b32", "nsfw-laion-l14"} <= set(list_heads())


def test_a_users_head_from_safetensors_and_json(tmp_path: Path) -> None:
    torch.manual_seed(1)
    module = mlp([64, 16, 1], "relu", "sigmoid")
    save_file(module.state_dict(), str(tmp_path / "quality.safetensors"))
    config = {
        "name": "quality",
        "embed_dim": 64,
        "layers": [64, 16, 1],
        "output": "sigmoid",
        "models": ["tiny"],
    }
    (tmp_path / "quality.json").write_text(json.dumps(config))
    head = load_head(str(tmp_path / "quality.json"))
    state = module.state_dict()
    x = unit(10, 64)
    h = relu(x @ state["0.weight"].numpy().T + state["0.bias"].numpy())
    h = sigmoid(h @ state["2.weight"].numpy().T + state["2.bias"].numpy())
    assert np.allclose(head.score(x), h[:, 0], atol=1e-6)
    # A linear head is the same format with two dims.
    linear = mlp([64, 1])
    save_file(linear.state_dict(), str(tmp_path / "lin.safetensors"))
    (tmp_path / "lin.json").write_text(
        json.dumps({"name": "lin", "embed_dim": 64, "layers": [64, 1]})
    )
    w = linear.state_dict()
    assert np.allclose(
        load_head(str(tmp_path / "lin.json")).score(x),
        (x @ w["0.weight"].numpy().T + w["0.bias"].numpy())[:, 0],
        atol=1e-6,
    )
    # Bad configs are clear errors.
    (tmp_path / "bad.json").write_text(
        json.dumps({"name": "bad", "embed_dim": 64, "layers": [32, 1]})
    )
    with pytest.raises(ConfigError, match="embed_dim 64"):
        load_head(str(tmp_path / "bad.json"))


def test_a_head_refuses_a_table_of_another_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "aesthetic.pth"
    torch.save(AestheticMLP().state_dict(), path)
    head = load_head(f"aesthetic-laion-v2={path}")
    head.check_table({"name": "ViT-L/14", "checkpoint_sha256": OPENAI_VIT_L14, "embed_dim": 768})
    head.check_table(
        {"name": "open_clip:ViT-L-14:openai", "checkpoint_sha256": "x" * 64, "embed_dim": 768}
    )
    with pytest.raises(HeadMismatchError, match="768"):
        head.check_table({"name": "tiny", "checkpoint_sha256": "y" * 64, "embed_dim": 64})
    with pytest.raises(HeadMismatchError, match="trained on the vectors of ViT-L/14"):
        head.check_table(
            {
                "name": "open_clip:ViT-L-14:laion2b_s32b_b82k",
                "checkpoint_sha256": "z" * 64,
                "embed_dim": 768,
            }
        )
