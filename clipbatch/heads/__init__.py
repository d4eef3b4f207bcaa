"""Heads: scores computed from a row's embedding alone (no image decoded again).

- :mod:`clipbatch.heads.laion`: LAION's improved aesthetic predictor and CLIP-based NSFW
  detectors, re-implemented in torch;
- :mod:`clipbatch.heads.registry`: names, downloads (sha256 pinned), local files and a
  user's own head (JSON + safetensors); ``list_heads()``;
- :mod:`clipbatch.heads.convert_keras`: the NSFW detectors' one-time Keras conversion.

**Watermarks are left out.** LAION's watermark score needs pixels (a timm EfficientNet
on 256x256 crops), not embeddings: it would have to run inside the embed pipeline and
decode every image again for one more column. A head here reads vectors only; a pixel
head is a separate feature (it would change the embed run's fingerprint, so it would be
opt-in and write its own ``_scores/`` files, never the table's).

Example::

    from clipbatch.heads.registry import list_heads, load_head

    list_heads()                      # ['aesthetic-laion-v2', 'nsfw-laion-b32', ...]
    head = load_head("aesthetic-laion-v2")
"""
