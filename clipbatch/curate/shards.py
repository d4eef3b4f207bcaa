"""Curated WebDataset shards in img2dataset's layout, published whole.

Each shard ``NNNNN`` is three files at the output URL, as img2dataset writes them:

- ``NNNNN.tar``: per sample ``{key}.{jpg|png|webp|…}`` (the source bytes, byte for
  byte), ``{key}.txt`` (the caption) and ``{key}.json`` (scores, lineage);
- ``NNNNN.parquet``: one row per sample (key, caption, url, status, width, height,
  sha256, where it came from, its scores);
- ``NNNNN_stats.json``: counts, and what made it (the table files, heads, spec, run).

Samples are keyed ``{shard}{index}`` (``000030042``), unique across nights because
shard numbers only grow. A shard is built on local disk, uploaded to
``{output}/_staging/{run}/``, and published (moved into place, the ``.tar`` last) only
after the selection's ``state.json`` commits it: a training job listing ``*.tar`` sees a
shard whole or not at all, and never a shard a crash would write again differently.

Example::

    builder = ShardBuilder(3, Path("/tmp/work"), rows_per_shard=10_000)
    builder.add(Sample(...))
    built = builder.finish({"spec": ...})
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import StorageOptions
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs, is_local_fs, join, move, remove_quietly

STAGING_DIR = "_staging"
SHARD_DIGITS = 5


def shard_name(number: int) -> str:
    return f"{number:0{SHARD_DIGITS}d}"


def sample_key(number: int, index: int, rows_per_shard: int) -> str:
    digits = max(4, len(str(rows_per_shard - 1)))
    return f"{shard_name(number)}{index:0{digits}d}"


def image_extension(data: bytes) -> str:
    """The image's format from its first bytes (the extension WebDataset readers decode by)."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    return "jpg"


@dataclass
class Sample:
    key: str
    image: bytes
    caption: str | None
    meta: dict[str, Any]  # the .json member
    row: dict[str, Any]  # the shard parquet's row


@dataclass
class BuiltShard:
    number: int
    files: dict[str, Path]  # suffix (".tar", ".parquet", "_stats.json") -> local file
    rows: int
    image_bytes: int
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return shard_name(self.number)


class ShardBuilder:
    """One curated shard, written sample by sample to a local tar (memory stays small)."""

    def __init__(self, number: int, workdir: Path, rows_per_shard: int) -> None:
        self.number = number
        self.workdir = workdir
        self.rows_per_shard = rows_per_shard
        self.tar_path = workdir / f"{shard_name(number)}.tar"
        self._tar = tarfile.open(self.tar_path, "w")  # noqa: SIM115 - closed by finish()
        self.rows: list[dict[str, Any]] = []
        self.image_bytes = 0

    @property
    def full(self) -> bool:
        return len(self.rows) >= self.rows_per_shard

    def add(self, sample: Sample) -> None:
        ext = image_extension(sample.image)
        self._member(f"{sample.key}.{ext}", sample.image)
        self._member(f"{sample.key}.txt", (sample.caption or "").encode())
        meta = json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode()
        self._member(f"{sample.key}.json", meta)
        self.rows.append(sample.row)
        self.image_bytes += len(sample.image)

    def _member(self, name: str, data: bytes) -> None:
        # Fixed owner, mode and time: the same samples make the same bytes.
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self._tar.addfile(info, io.BytesIO(data))

    def finish(self, stats: dict[str, Any], schema: pa.Schema) -> BuiltShard:
        self._tar.close()
        name = shard_name(self.number)
        parquet = self.workdir / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(self.rows, schema=schema), parquet)
        stats = {
            "count": len(self.rows),
            "successes": len(self.rows),
            "failed_to_download": 0,
            "failed_to_resize": 0,
            "image_bytes": self.image_bytes,
            **stats,
        }
        stats_path = self.workdir / f"{name}_stats.json"
        stats_path.write_text(json.dumps(stats, indent=1, sort_keys=True))
        return BuiltShard(
            self.number,
            {".parquet": parquet, "_stats.json": stats_path, ".tar": self.tar_path},
            len(self.rows),
            self.image_bytes,
            stats,
        )


SUFFIXES = (".parquet", "_stats.json", ".tar")  # publish order: the .tar last


def stage(built: BuiltShard, output: str, run: str, storage: StorageOptions) -> None:
    """Upload a built shard's files to ``{output}/_staging/{run}/`` (each whole)."""
    for suffix in SUFFIXES:
        local = built.files[suffix]
        fs, path = get_fs(join(output, STAGING_DIR, run, local.name), storage)
        if is_local_fs(fs):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(path).with_name(f".{local.name}.part")
            with local.open("rb") as src, tmp.open("wb") as dst:
                while chunk := src.read(8 << 20):
                    dst.write(chunk)
            tmp.replace(path)
        else:
            with_retries(lambda fs=fs, path=path, local=local: fs.put_file(str(local), path),
                         f"upload {path}")  # fmt: skip
        local.unlink()


def publish(number: int, output: str, run: str, storage: StorageOptions) -> None:
    """Move a staged shard into place, its ``.tar`` last; idempotent (a rerun after a crash
    finds the files already moved and moves the rest)."""
    name = shard_name(number)
    for suffix in SUFFIXES:
        fs, staged = get_fs(join(output, STAGING_DIR, run, f"{name}{suffix}"), storage)
        _, final = get_fs(join(output, f"{name}{suffix}"), storage)
        if with_retries(lambda fs=fs, staged=staged: fs.exists(staged), f"stat {staged}"):
            move(fs, staged, final, name)


def remove_staging(output: str, run: str, storage: StorageOptions) -> None:
    fs, path = get_fs(join(output, STAGING_DIR, run), storage)
    remove_quietly(fs, path, recursive=True)
    if is_local_fs(fs):
        parent = Path(path).parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
