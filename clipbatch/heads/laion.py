"""LAION's published heads, re-implemented in torch with their own layer names.

- **Aesthetic predictor** (christophschuhmann/improved-aesthetic-predictor,
  ``sac+logos+ava1-l14-linearMSE.pth``): an MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 over
  L2-normalised OpenAI ViT-L/14 image embeddings; scores about 1 to 10. Published as a
  PyTorch state dict, loaded as it is.
- **NSFW detector** (LAION-AI/CLIP-based-NSFW-Detector), one per model width: ViT-B/32
  (512 -> 32 -> 32 -> 1) and ViT-L/14 (768 -> 64 -> 512 -> 256 -> 1), each behind a
  normalisation layer (a mean and a variance per input) and ending in a sigmoid: a
  probability of NSFW. Published as Keras/autokeras models; clipbatch does not depend on
  TensorFlow: convert them once with :mod:`clipbatch.heads.convert_keras`, which writes
  the weights as safetensors under the layer names below.
"""

from __future__ import annotations

import torch
from torch import nn

# OpenAI's checkpoints, by the sha256 clip verifies them with (clip.clip._MODELS).
OPENAI_VIT_B32 = "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"
OPENAI_VIT_L14 = "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"
# The same models under every family's name: their vectors are the same space.
VIT_B32_NAMES = (
    "ViT-B/32",
    "openai:ViT-B/32",
    "open_clip:ViT-B-32:openai",
    "open_clip:ViT-B-32-quickgelu:openai",
    "hf:openai/clip-vit-base-patch32",
)
VIT_L14_NAMES = (
    "ViT-L/14",
    "openai:ViT-L/14",
    "open_clip:ViT-L-14:openai",
    "open_clip:ViT-L-14-quickgelu:openai",
    "hf:openai/clip-vit-large-patch14",
)


KERAS_EPSILON = 1e-7  # keras.backend.epsilon(), the floor of Normalization's divisor


class AestheticMLP(nn.Module):
    """improved-aesthetic-predictor's MLP (its dropouts are inert at inference)."""

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Normalization(nn.Module):
    """Keras' Normalization layer: ``(x - mean) / max(sqrt(variance), 1e-7)`` per feature."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("variance", torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / torch.clamp(torch.sqrt(self.variance), min=KERAS_EPSILON)


class NSFWB32(nn.Module):
    """The ViT-B/32 NSFW detector: normalisation, 512 -> 32 -> 32 -> 1, sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = Normalization(512)
        self.linear_1 = nn.Linear(512, 32)
        self.linear_2 = nn.Linear(32, 32)
        self.linear_3 = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.linear_1(self.norm(x)))
        x = torch.relu(self.linear_2(x))
        return torch.sigmoid(self.linear_3(x))


class NSFWL14(nn.Module):
    """The ViT-L/14 NSFW detector: normalisation, 768 -> 64 -> 512 -> 256 -> 1, sigmoid."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = Normalization(768)
        self.linear_1 = nn.Linear(768, 64)
        self.linear_2 = nn.Linear(64, 512)
        self.linear_3 = nn.Linear(512, 256)
        self.linear_4 = nn.Linear(256, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.linear_1(self.norm(x)))
        x = torch.relu(self.linear_2(x))
        x = torch.relu(self.linear_3(x))
        return torch.sigmoid(self.linear_4(x))
