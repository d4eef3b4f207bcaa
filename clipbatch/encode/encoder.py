"""Batched encoding for every model family: images from uint8 batches, captions from tokens.

- Images arrive as uint8 NxHxWx3 (resized and cropped per image). ToTensor and
  Normalize happen here, batched, on the device, with the model's own mean and std.
- Text is tokenised by the model's own tokenizer, truncated to the caption limit in
  effect (``max_caption_tokens``, default and at most the family's context length).
  Where it is proven exact for the family, text is encoded only up to the longest caption
  in the batch: OpenAI's and open_clip's CLIP text towers are causal and read the feature
  at the end-of-text token, so padding after it cannot change the result (docs/design.md §8;
  proven in tests/encode/test_encoder.py and tests/models/). Other towers (SigLIP)
  encode the full padded context.
- A CUDA out-of-memory halves the batch and retries it (docs/design.md §5).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from clipbatch.faults import before_forward
from clipbatch.models.base import Tokens, repeat_rows
from clipbatch.models.loading import LoadedModel

log = logging.getLogger(__name__)


AUTO_START = 256  # a batch every supported GPU fits with ViT-B/32 and ViT-L/14
AUTO_LIMIT = 4096


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def probe_batch_size(fits: Callable[[int], None], start: int, limit: int) -> int:
    """Double from ``start`` while ``fits(size)`` returns; the last size that did.

    ``fits`` raises an out-of-memory error when a size does not fit. When even
    ``start`` does not fit, halve until one does (down to 1).
    """
    size = start
    while True:
        try:
            fits(size)
            break
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e) or size == 1:
                raise
            size = max(1, size // 2)
    while size * 2 <= limit:
        try:
            fits(size * 2)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            break
        size *= 2
    return size


class ClipEncoder:
    """Encodes image and caption batches with one loaded model, through its family's backend.

    ``context_tokens`` is the caption limit (``max_caption_tokens``): None is the family's
    context length, and a larger value is clamped to it. The value in effect is
    ``self.context_tokens``.
    """

    def __init__(
        self, loaded: LoadedModel, batch_size: int, context_tokens: int | None = None
    ) -> None:
        self.loaded = loaded
        self.backend = loaded.backend
        self.model = loaded.model
        self.device = torch.device(loaded.device)
        self.batch_size = batch_size
        context = self.backend.context_length
        self.context_tokens = min(context_tokens, context) if context_tokens else context
        image = self.backend.image
        self._mean = torch.tensor(image.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(image.std, device=self.device).view(1, 3, 1, 1)
        self._autocast = loaded.dtype == torch.bfloat16
        self._pin = self.device.type == "cuda"

    @property
    def pins_memory(self) -> bool:
        """Whether host batches should be pinned for asynchronous copies (CUDA only)."""
        return self._pin

    def text_metadata(self) -> dict[str, Any]:
        """The text side in effect, for file metadata."""
        return {
            "tokenizer": self.backend.tokenizer_name,
            "context_length": self.backend.context_length,
            "max_caption_tokens": self.context_tokens,
            "padding": self.backend.text_padding,
        }

    # -- images ----------------------------------------------------------------
    def pixels_to_input(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 NxHxWx3 -> normalised float NCHW on the device (ToTensor+Normalize, batched)."""
        if isinstance(pixels, np.ndarray):
            # np.asarray(PIL image) is read-only; torch refuses to share such memory quietly.
            t = torch.from_numpy(pixels if pixels.flags.writeable else pixels.copy())
        else:
            t = pixels
        if self._pin and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return self._normalise(t.to(self.device, non_blocking=True))

    def _normalise(self, t: torch.Tensor) -> torch.Tensor:
        # Contiguous NCHW, as ToTensor gives: a channels-last input would pick other conv
        # kernels and change the last bits of a ResNet tower's output.
        t = t.permute(0, 3, 1, 2).contiguous().float().div_(255)
        # The same ops, in the same order, as ToTensor + Normalize: bit-identical inputs.
        return t.sub_(self._mean).div_(self._std)

    def encode_images(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """Unnormalised float32 image embeddings for a uint8 NxHxWx3 batch."""
        if len(pixels) == 0:
            return np.zeros((0, self.loaded.embed_dim), np.float32)
        return self._with_oom_backoff(
            pixels, lambda chunk: self.backend.encode_image(self.pixels_to_input(chunk))
        )

    # -- text ------------------------------------------------------------------
    def tokenize(self, captions: Sequence[str]) -> tuple[Tokens, list[bool]]:
        """The family's tokens (padded to the longest caption where trimming is exact, else to
        the context), and which captions were truncated to ``context_tokens``."""
        return self.backend.tokenize(captions, self.context_tokens)

    def encode_texts(self, captions: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """Unnormalised float32 text embeddings, and truncation flags."""
        tokens, truncated = self.tokenize(captions)
        return self.encode_tokens(tokens), truncated

    def encode_tokens(self, tokens: Tokens) -> np.ndarray:
        """Unnormalised float32 text embeddings for tokens from :meth:`tokenize`.

        The pipeline tokenises on its worker pool, off the encode thread, and calls this.
        """
        if len(tokens) == 0:
            return np.zeros((0, self.loaded.embed_dim), np.float32)
        if self._pin:
            tokens = tokens.pin_memory()
        return self._with_oom_backoff(
            tokens,
            lambda chunk: self.backend.encode_text(chunk.to(self.device, non_blocking=True)),
        )

    # -- batch size --------------------------------------------------------------
    def find_batch_size(self, start: int = AUTO_START, limit: int = AUTO_LIMIT) -> int:
        """The largest batch (doubling from ``start``, up to ``limit``) whose forward pass fits.

        On the CPU nothing runs out of memory in a useful way, and a bigger batch is not
        faster, so the safe start is kept. On CUDA each candidate runs a full image and
        a full-context text forward pass; the OOM back-off still guards every later batch.
        """
        if self.device.type != "cuda":
            self.batch_size = start
            return start
        height, width = self.backend.image.size
        longest, _ = self.tokenize(["a " * (2 * self.context_tokens)])

        def fits(size: int) -> None:
            pixels = torch.zeros(size, height, width, 3, dtype=torch.uint8, device=self.device)
            tokens = repeat_rows(longest, size).to(self.device)
            try:
                with self._inference():
                    self.backend.encode_image(self._normalise(pixels))
                    self.backend.encode_text(tokens)
                torch.cuda.synchronize(self.device)
            finally:
                del pixels, tokens
                torch.cuda.empty_cache()

        size = probe_batch_size(fits, start, limit)
        torch.cuda.empty_cache()
        self.batch_size = size
        log.info("batch size auto: %d fits on %s", size, self.device)
        return size

    # -- shared ----------------------------------------------------------------
    def _with_oom_backoff(self, batch: np.ndarray | torch.Tensor, forward: Callable) -> np.ndarray:
        outputs: list[np.ndarray] = []
        step = self.batch_size
        start = 0
        while start < len(batch):
            chunk = batch[start : start + step]
            try:
                with self._inference():
                    before_forward(len(chunk))  # a no-op unless an OOM drill is switched on
                    out = forward(chunk)
                outputs.append(out.float().cpu().numpy())
                start += len(chunk)
            except (torch.OutOfMemoryError, RuntimeError) as e:
                if not is_oom(e) or step == 1:
                    raise
                step = max(1, step // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                log.warning(
                    "out of memory at batch %d; retrying this batch at %d", len(chunk), step
                )
                self.batch_size = step  # keep the smaller size for later batches too
        return np.concatenate(outputs, axis=0)

    def _inference(self) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        if self._autocast:
            stack.enter_context(torch.autocast(self.device.type, dtype=torch.bfloat16))
        return stack


def l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
