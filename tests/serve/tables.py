"""Tables for the server's tests, written by the library itself (tiny model, CPU, no Prefect)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from clipbatch.config import EmbedConfig, build_config
from clipbatch.pipeline.worker import run_plan
from clipbatch.plan.planner import plan_shards
from clipbatch.synthetic import write_webdataset


def embed(config: EmbedConfig) -> None:
    """Plan and run every shard of ``config`` in this process (what the flow's tasks do)."""
    plan = plan_shards(config)
    run_plan(plan, "test-run")


def tiny_config(source: str | dict, dest: str, storage: dict | None = None) -> EmbedConfig:
    storage = storage or {}
    source_options = {"url": source} if isinstance(source, str) else dict(source)
    return build_config(
        {
            "source": {**source_options, "storage": storage},
            "sink": {"url": dest, "storage": storage},
            "model": {"name": "tiny"},
            "runtime": {"device": "cpu", "batch_size": 8},
        }
    )


def webdataset_with_failures(
    root: Path, shards: int = 2, per_shard: int = 12, seed: int = 11
) -> list[Path]:
    """Synthetic shards, plus in the first one a caption without an image and an image
    that is not one (rows with a failed image: text vector only)."""
    paths = write_webdataset(root, shards=shards, per_shard=per_shard, seed=seed, size=64)
    with tarfile.open(paths[0], "a") as tar:
        for name, data in (
            ("zz-no-image.txt", b"a caption whose image is missing"),
            ("zz-not-an-image.jpg", b"this is not a jpeg"),
            ("zz-not-an-image.txt", b"a caption with a broken image"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return paths
