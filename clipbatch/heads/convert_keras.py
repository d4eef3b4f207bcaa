"""Convert LAION's Keras NSFW detectors to the safetensors clipbatch loads (run once).

LAION publishes the CLIP-based NSFW detectors as autokeras models (a zip of a Keras
SavedModel). clipbatch runs them in torch (:mod:`clipbatch.heads.laion`) and does not
depend on TensorFlow; this script, run once on any machine that has it, reads the Keras
weights and writes them under the torch layer names::

    pip install tensorflow autokeras          # here only, not in clipbatch's environment
    python -m clipbatch.heads.convert_keras nsfw-laion-l14 nsfw-laion-l14.safetensors
    # (downloads clip_autokeras_binary_nsfw.zip; or give it: --source PATH.zip|FOLDER)
    clipbatch score ROOT --head nsfw-laion-l14=nsfw-laion-l14.safetensors

The file's metadata records the source archive's sha256. Keras' ``get_weights()`` gives,
in order: the Normalization layer's mean, variance and count, then each Dense layer's
kernel ([in, out]) and bias; torch's Linear keeps weight as [out, in].
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch

from clipbatch.heads.registry import NAMED

LINEARS = {"nsfw-laion-b32": 3, "nsfw-laion-l14": 4}


def keras_weights_to_state_dict(name: str, weights: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """The torch state dict of head ``name`` from its Keras model's ``get_weights()``."""
    if name not in LINEARS:
        raise ValueError(f"no Keras conversion for {name!r}; one of {', '.join(LINEARS)}")
    mean, variance, _count, *dense = weights
    if len(dense) != 2 * LINEARS[name]:
        raise ValueError(
            f"{name}: expected {LINEARS[name]} Dense layers after the Normalization layer, "
            f"found {len(dense) / 2:g}"
        )
    state = {
        "norm.mean": torch.from_numpy(np.asarray(mean, np.float32).reshape(-1)),
        "norm.variance": torch.from_numpy(np.asarray(variance, np.float32).reshape(-1)),
    }
    for i in range(LINEARS[name]):
        kernel, bias = dense[2 * i], dense[2 * i + 1]
        state[f"linear_{i + 1}.weight"] = torch.from_numpy(
            np.ascontiguousarray(kernel.T, np.float32)
        )
        state[f"linear_{i + 1}.bias"] = torch.from_numpy(np.asarray(bias, np.float32))
    model = NAMED[name].build()
    model.load_state_dict(state)  # the shapes must be the head's: fails loudly if not
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m clipbatch.heads.convert_keras", description=__doc__
    )
    parser.add_argument("head", choices=sorted(LINEARS))
    parser.add_argument("out", help="the .safetensors file to write")
    parser.add_argument(
        "--source", help="the published zip, or its unpacked folder (default: download)"
    )
    args = parser.parse_args(argv)
    try:
        import autokeras as ak
        import tensorflow as tf
    except ImportError:
        print(
            "convert_keras needs tensorflow and autokeras: pip install tensorflow autokeras",
            file=sys.stderr,
        )
        return 2
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory() as work:
        source = Path(args.source) if args.source else _download(NAMED[args.head].url, Path(work))
        digest = hashlib.sha256(source.read_bytes()).hexdigest() if source.is_file() else ""
        folder = source
        if source.is_file():
            with zipfile.ZipFile(source) as archive:
                archive.extractall(work)
            folder = next(p for p in Path(work).iterdir() if p.is_dir())
        model = tf.keras.models.load_model(str(folder), custom_objects=ak.CUSTOM_OBJECTS)
        state = keras_weights_to_state_dict(args.head, model.get_weights())
    save_file(
        state,
        args.out,
        metadata={"head": args.head, "source": str(source), "source_sha256": digest},
    )
    print(f"wrote {args.out} ({args.head}, from {source}, sha256 {digest[:12]}…)")
    return 0


def _download(url: str, folder: Path) -> Path:
    target = folder / url.rsplit("/", 1)[-1]
    with urllib.request.urlopen(url, timeout=120) as response, target.open("wb") as out:
        while chunk := response.read(1 << 20):
            out.write(chunk)
    return target


if __name__ == "__main__":
    sys.exit(main())
