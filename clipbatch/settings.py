"""Process-wide settings, applied where work starts, never on import.

Importing clipbatch changes nothing about the process. These are applied by the places
that start work: the CLI, a flow run (``flows/__init__.py``, so also worker-started
deployment runs), every shard task's process (``tasks/__init__.py``: the thread pool,
Dask and Ray workers), per-device worker processes, and the bench.

- ``OMP_WAIT_POLICY=PASSIVE`` (unless set): torch's OpenMP threads sleep when idle instead
  of spinning on the cores the decoders need. Measured on 2 cores over 2,000 images with
  the tiny model: 0.8 s of CPU and about 8% of the wall time. libgomp reads it once, when
  torch loads, so it only takes effect before torch is imported.
- PIL's decompression-bomb limit is raised to ``runtime.max_image_pixels`` when that is
  higher (:func:`allow_image_pixels`, by each worker): clipbatch checks its own limit from
  the header before decoding, and PIL's default must not refuse images below it. PIL's
  warning for large images is silenced: they are ours to judge.
"""

from __future__ import annotations

import os
import sys
import warnings


def apply_process_settings() -> None:
    """The settings clipbatch wants in a process that does its work (idempotent)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # clip-anytorch imports pkg_resources (setuptools<81 keeps it); its deprecation
    # warning is noise for our users.
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated", category=UserWarning)


def allow_image_pixels(limit: int) -> None:
    """Let PIL open images up to ``limit`` pixels; clipbatch's own check comes first."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and limit > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = limit
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
