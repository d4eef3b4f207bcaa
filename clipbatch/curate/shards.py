"""Curated WebDataset shards in img2dataset's layout, published whole.

Each shard ``NNNNN`` is three files at the output URL, as img2dataset writes them:

- ``NNNNN.tar``: per sample ``{key}.{jpg|png|webp|…}`` (the source bytes, byte for
  byte), ``{key}.txt`` (the caption) and ``{key}.json`` (scores, lineage);
- ``NNNNN.parquet``: one row per sample (key, caption, url, status, width, height,
  sha256, where it came from, its scores);
- ``NNNNN_stats.json``: counts, and what made it (the table files, heads, spec, run).

Samples are keyed ``{shard}{index}`` (``000030042``), unique across nights because
shard numbers only grow. A shard is built on local disk and uploaded where nothing lists
it: on S3 as multipart uploads to its final keys, not completed; elsewhere to
``{output}/_staging/{run}/``. It is published (the uploads completed, or the files moved
into place; the ``.tar`` last) only after the selection's ``state.json`` commits it: a
training job listing ``*.tar`` sees a shard whole or not at all, and never a shard a
crash would write again differently.

Example::

    builder = ShardBuilder(3, Path("/tmp/work"), rows_per_shard=10_000)
    builder.add(Sample(...))
    built = builder.finish({"spec": ...})
"""

from __future__ import annotations

import json
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import StorageOptions
from clipbatch.io import multipart
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


def _tarfile_header(name: str, size: int) -> bytes:
    # Fixed owner, mode and time: the same samples make the same bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    return info.tobuf(tarfile.DEFAULT_FORMAT, tarfile.ENCODING, "surrogateescape")


_BLANK = bytearray(_tarfile_header("", 0))
_BLANK[148:156] = b" " * 8  # the checksum field, as it is summed


def _filled_header(name: str, size: int) -> bytes:
    """tarfile's header for a short ASCII name (no PAX records): the blank one with its
    name, size and checksum filled in, without tarfile's per-header work."""
    buf = bytearray(_BLANK)
    buf[0 : len(name)] = name.encode("ascii")
    buf[124:136] = b"%011o\0" % size
    buf[148:155] = b"%06o\0" % sum(buf)
    return bytes(buf)


_FILLED_IS_TARFILES = all(
    _filled_header(n, z) == _tarfile_header(n, z)
    for n, z in (("", 0), ("000000001.jpg", 35_001), ("k" * 100, 8**11 - 1), ("a.json", 1))
)  # checked against this Python's tarfile, else tarfile writes every header


def member_header(name: str, size: int) -> bytes:
    """The tar header of a member (a regular file, mode 0644, time 0, owner 0), the bytes
    ``tarfile.TarInfo.tobuf`` makes for it in tarfile's default (PAX) format."""
    if _FILLED_IS_TARFILES and len(name) <= 100 and name.isascii() and size < 8**11:
        return _filled_header(name, size)
    return _tarfile_header(name, size)


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
        # Written here as tarfile.open(path, "w") writes it (the same bytes), without its
        # per-member copies and bookkeeping: a header, the data, padding to a block.
        self._tar = self.tar_path.open("wb", buffering=1 << 20)  # noqa: SIM115 - finish()
        self._offset = 0
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
        header = member_header(name, len(data))
        pad = -len(data) % tarfile.BLOCKSIZE
        self._tar.write(header)
        self._tar.write(data)
        if pad:
            self._tar.write(tarfile.NUL * pad)
        self._offset += len(header) + len(data) + pad

    def _close_tar(self) -> None:
        """The end-of-archive blocks, and zeros up to a whole record (as tarfile's close)."""
        end = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
        self._tar.write(end + tarfile.NUL * (-(self._offset + len(end)) % tarfile.RECORDSIZE))
        self._tar.close()

    def finish(self, stats: dict[str, Any], schema: pa.Schema) -> BuiltShard:
        self._close_tar()
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


def stage(
    built: BuiltShard, output: str, run: str, storage: StorageOptions
) -> dict[str, dict[str, Any]]:
    """Upload a built shard's files where nothing lists them yet, each whole.

    On S3: as multipart uploads to their final keys, not completed (invisible until
    :func:`publish` completes them; no byte is copied twice); returns, per suffix, what
    completing it needs (for the commit record). Elsewhere: to
    ``{output}/_staging/{run}/`` (to an object store, the three at once); returns ``{}``.
    """
    name = built.name
    fs, _ = get_fs(join(output, f"{name}.tar"), storage)
    if multipart.supported(fs):

        def deferred(suffix: str) -> tuple[str, dict[str, Any]]:
            _, path = get_fs(join(output, f"{name}{suffix}"), storage)
            upload = multipart.upload_deferred(fs, path, built.files[suffix])
            built.files[suffix].unlink()
            return suffix, upload.as_dict()

        with ThreadPoolExecutor(len(SUFFIXES), thread_name_prefix="curate-upload") as pool:
            return dict(pool.map(deferred, SUFFIXES))

    def upload(suffix: str) -> None:
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
            with_retries(lambda: fs.put_file(str(local), path), f"upload {path}")
        local.unlink()

    if is_local_fs(fs):
        for suffix in SUFFIXES:
            upload(suffix)
    else:
        with ThreadPoolExecutor(len(SUFFIXES), thread_name_prefix="curate-upload") as pool:
            list(pool.map(upload, SUFFIXES))
    return {}


def publish(
    number: int,
    output: str,
    run: str,
    storage: StorageOptions,
    uploads: dict[str, dict[str, Any]] | None = None,
) -> None:
    """Make a staged shard visible, its ``.tar`` last (the other files at once, before
    it): complete its ``uploads`` (from :func:`stage`), or move it from the staging
    folder. Idempotent: a rerun after a crash finds the files published already and
    publishes the rest."""
    name = shard_name(number)

    def one(suffix: str) -> None:
        _, final = get_fs(join(output, f"{name}{suffix}"), storage)
        if uploads:
            upload = multipart.DeferredUpload.from_dict(uploads[suffix])
            multipart.complete(fs, final, upload)
            return
        _, staged = get_fs(join(output, STAGING_DIR, run, f"{name}{suffix}"), storage)
        try:  # the copy's own look-up says whether it is still staged: no stat first
            move(fs, staged, final, name)
        except FileNotFoundError:
            if with_retries(lambda: fs.exists(staged), f"stat {staged}"):
                raise  # staged, yet not movable (the destination): a real error
            # moved already, by the run that crashed

    before, last = SUFFIXES[:-1], SUFFIXES[-1]
    fs, _ = get_fs(output, storage)
    if is_local_fs(fs):
        for suffix in before:
            one(suffix)
    else:
        with ThreadPoolExecutor(len(before), thread_name_prefix="curate-publish") as pool:
            list(pool.map(one, before))
    one(last)


def abort_abandoned(output: str, storage: StorageOptions, keep: set[str]) -> int:
    """Abort the uploads of shard files under ``output`` left by runs that crashed before
    their commit (their ids not in ``keep``); one listing request. Returns how many."""
    fs, path = get_fs(output, storage)
    if not multipart.supported(fs):
        return 0
    aborted = 0
    for key, upload_id in multipart.pending(fs, path):
        folder, _, name = key.rpartition("/")
        if folder == path.rstrip("/") and upload_id not in keep and _SHARD_FILE.fullmatch(name):
            multipart.abort(fs, key, upload_id)
            aborted += 1
    return aborted


_SHARD_FILE = re.compile(rf"\d{{{SHARD_DIGITS},}}({'|'.join(re.escape(s) for s in SUFFIXES)})")


def remove_staging(output: str, run: str, storage: StorageOptions) -> None:
    fs, path = get_fs(join(output, STAGING_DIR, run), storage)
    remove_quietly(fs, path, recursive=True)
    if is_local_fs(fs):
        parent = Path(path).parent
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
