"""Configuration errors found before any work starts: in about a second, one line each.

A run that cannot work should say so before a flow, a server or a model is started:

- the source does not exist (a typo in a path, a bucket or a prefix);
- the destination cannot be written (a local folder this user may not write) or its
  bucket does not exist;
- the model name is not a model (grammar, an unknown clip name or open_clip
  architecture, a checkpoint file that is not there);
- the device is not on this machine (CUDA without an NVIDIA driver, MPS off macOS).

Each check is cheap: a listing request or two, file lookups, no torch import. What needs
more (a hub download, a checkpoint's sha256, every shard) is the plan's, which reports
its own errors the same way. Every error is a :class:`~clipbatch.errors.ConfigError`
naming what is wrong and how to fix it.

Example::

    from clipbatch.config import build_config
    from clipbatch.plan.preflight import preflight

    preflight(build_config({"source": "./data", "dest": "./emb", "model": "ViT-Q/99"}))
    # ConfigError: model 'ViT-Q/99' is not a clip model name (RN50, ...) nor a checkpoint file ...
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from clipbatch.config import EmbedConfig, ModelConfig, RuntimeConfig, SinkConfig, SourceConfig
from clipbatch.errors import ConfigError
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import check_writable, get_fs, is_local, protocol_of
from clipbatch.models import names
from clipbatch.models.extras import install_hint
from clipbatch.sources.listing import expand_braces

GLOB_CHARS = "*?["


def preflight(config: EmbedConfig, source: bool = True) -> None:
    """Every cheap check, model and device first (no request), then storage.

    ``source=False`` leaves the source to the plan, whose one listing says as much (the
    flow's case: its request count per run stays what the plan makes).
    """
    check_model(config.model)
    check_device(config.runtime)
    if source:
        check_source(config.source)
    check_destination(config.sink)


# -- model ----------------------------------------------------------------------------


def check_model(model: ModelConfig) -> None:
    """The name parses, and names a model that can exist here, without loading anything."""
    name = names.parse_model_name(model.name)
    if name.family == names.OPENAI and name.form == names.BUILTIN:
        value = name.value
        if value == names.TINY or value in names.OPENAI_MODELS:
            return
        path = Path(value)
        if not path.is_file():
            hint = (
                " (a model folder is open_clip:local-dir:PATH or hf:PATH)" if path.is_dir() else ""
            )
            raise ConfigError(
                f"model {model.name!r} is not a clip model name ({', '.join(names.OPENAI_MODELS)}, "
                f"{names.TINY}) nor a checkpoint file{hint}; other families are written "
                "open_clip:ARCH:TAG or hf:ORG/NAME (`clipbatch models` lists them)"
            )
    elif name.family == names.OPEN_CLIP:
        spec = importlib.util.find_spec("open_clip")
        if spec is None:
            raise ConfigError(f"model {model.name!r} needs open_clip: {install_hint('open_clip')}")
        if name.form == names.ARCH_TAG:
            known = open_clip_architectures()
            if known and name.arch not in known:
                raise ConfigError(
                    f"model {model.name!r}: open_clip has no architecture {name.arch!r}; "
                    f"`clipbatch models --family open_clip` lists them"
                )
        elif (
            name.form == names.LOCAL_DIR and is_local(name.value) and not Path(name.value).is_dir()
        ):
            raise ConfigError(f"model {model.name!r}: no folder {name.value!r}")
    elif name.family == names.HF:
        if importlib.util.find_spec("transformers") is None:
            raise ConfigError(f"model {model.name!r} needs transformers: {install_hint('hf')}")
        if name.form == names.FOLDER and is_local(name.value) and not Path(name.value).is_dir():
            raise ConfigError(f"model {model.name!r}: no folder {name.value!r}")


def open_clip_architectures() -> set[str]:
    """open_clip's built-in architectures, from its config files (no import, no torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return set()
    folder = Path(next(iter(spec.submodule_search_locations))) / "model_configs"
    return {p.stem for p in folder.glob("*.json")}


# -- device ---------------------------------------------------------------------------


def check_device(runtime: RuntimeConfig) -> None:
    """A CUDA device needs an NVIDIA driver here; MPS needs macOS. (Whether torch sees the
    GPU is decided when the model loads; this catches the machine that has none.) Shards
    sent to a Dask or Ray cluster run on its machines, not here: not checked."""
    if runtime.task_runner not in (None, "", "threads"):
        return
    wanted = list(runtime.devices) or [runtime.device]
    for device in wanted:
        if (device == "all" or device.startswith("cuda")) and not nvidia_driver_present():
            raise ConfigError(
                f"device {device!r} was asked for, but this machine has no NVIDIA GPU driver; "
                "use --device cpu (or auto, which picks CUDA when there is one)"
            )
        if device == "mps" and sys.platform != "darwin":
            raise ConfigError("device 'mps' is Apple's GPU, only on macOS; use --device cpu")


def nvidia_driver_present() -> bool:
    """Whether the kernel has an NVIDIA driver loaded (Linux), or we cannot tell (others)."""
    if not sys.platform.startswith("linux"):
        return True  # no cheap test: torch decides when the model loads
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")


# -- storage --------------------------------------------------------------------------


def static_prefix(url: str) -> str:
    """The part of a (first brace-expanded) URL before any glob character."""
    first = expand_braces(url)[0]
    cut = min((first.find(c) for c in GLOB_CHARS if c in first), default=-1)
    if cut == -1:
        return first
    return first[:cut].rsplit("/", 1)[0] + "/"


def check_source(source: SourceConfig) -> None:
    """Something exists where the source points (one or two requests on a store)."""
    prefix = static_prefix(source.url)
    fs, path = get_fs(prefix, source.storage)
    if not with_retries(lambda: fs.exists(path), f"stat {prefix}"):
        missing = "" if prefix == source.url else f" ({prefix} not found)"
        raise ConfigError(
            f"source {source.url!r} does not exist{missing}; check --source (source.url)"
        )


def check_destination(sink: SinkConfig) -> None:
    """A local destination this user can write; on a store, a bucket that exists."""
    if is_local(sink.url):
        check_writable(sink.url, sink.storage)
        return
    fs, path = get_fs(sink.url, sink.storage)
    bucket = path.split("/", 1)[0]
    if protocol_of(sink.url) in ("s3", "s3a", "gs", "gcs", "az", "abfs") and not with_retries(
        lambda: fs.exists(bucket), f"stat {bucket}"
    ):
        raise ConfigError(
            f"destination {sink.url!r}: bucket {bucket!r} does not exist (or these credentials "
            "cannot see it); create it, or fix --dest (sink.url)"
        )
