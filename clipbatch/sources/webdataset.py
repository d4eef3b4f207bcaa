"""WebDataset tar shards, as img2dataset writes them (docs/design.md §1).

A shard is one ``NNNNN.tar``; members sharing a key (the basename up to its first
dot) form one row: ``{key}.jpg|jpeg|png|webp``, ``{key}.txt``, ``{key}.json``. The tar
is streamed, so memory does not grow with shard size. A sibling ``NNNNN.parquet``
(img2dataset's per-shard table) is joined by key, never by row order.
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
from collections.abc import Collection, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import SourceConfig
from clipbatch.io.retry import RetryingReader, with_retries
from clipbatch.io.storage import get_fs, read_parquet_metadata, to_uri
from clipbatch.records import (
    DUPLICATE_KEY,
    MISSING_IMAGE,
    SHARD_DAMAGED,
    UNSAFE_PATH,
    RawSample,
    ShardSpec,
    passthrough_name,
)
from clipbatch.sources.base import check_unique_names
from clipbatch.sources.detect import TAR_SUFFIXES
from clipbatch.sources.listing import Listing, filter_suffixes, list_source_url
from clipbatch.sources.text import parse_json, set_caption

log = logging.getLogger(__name__)

SIDECAR_SKIP = {"key", "caption"}  # the key joins; the caption comes from the tar member
_READ_BLOCK = 8 * 1024 * 1024


def stem_and_ext(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def is_unsafe(name: str) -> bool:
    return name.startswith("/") or ".." in name.split("/") or "\\" in name


class WebDatasetReader:
    kind = "webdataset"

    def __init__(self, source: SourceConfig) -> None:
        self.source = source
        self.image_exts = tuple(e.lower().lstrip(".") for e in source.image_exts)
        # None: an image-only dataset; an empty image_exts: a caption-only one.
        self.caption_ext = source.caption_ext.lower().lstrip(".") if source.caption_ext else None
        self.has_captions = self.caption_ext is not None or bool(source.caption_json_field)

    # -- listing ---------------------------------------------------------------
    def list_shards(self) -> list[ShardSpec]:
        """List the source and make its shards (ad-hoc use; the plan lists once)."""
        return self.shards_from(list_source_url(self.source))

    def shards_from(self, listing: Listing) -> list[ShardSpec]:
        """One shard per tar; its sidecar ``NNNNN.parquet`` is found in the same listing
        (a HEAD only when the tar's folder was not listed, e.g. a single-file source)."""
        fs = listing.fs
        shards = []
        for info in filter_suffixes(listing.matches, TAR_SUFFIXES):
            p = info.path
            base, _, name = p.rpartition("/")
            stem = name
            for suffix in TAR_SUFFIXES:
                if stem.lower().endswith(suffix):
                    stem = stem[: -len(suffix)]
                    break
            sidecar = listing.sibling(f"{base}/{stem}.parquet" if base else f"{stem}.parquet")
            shards.append(
                ShardSpec(
                    uri=to_uri(fs, p),
                    name=stem,
                    kind=self.kind,
                    version=info.version,
                    sidecar_uri=to_uri(fs, sidecar.path) if sidecar else None,
                    sidecar_version=sidecar.version if sidecar else None,
                )
            )
        check_unique_names(shards)
        return shards

    # -- schema ----------------------------------------------------------------
    def passthrough_fields(self, shard: ShardSpec) -> list[pa.Field]:
        fields = [pa.field("json", pa.string())]
        if shard.sidecar_uri:
            fs, path = get_fs(shard.sidecar_uri, self.source.storage)
            schema = with_retries(
                lambda: read_parquet_metadata(fs, path).schema.to_arrow_schema(), f"read {path}"
            )
            fields += [
                pa.field(passthrough_name(f.name), f.type)
                for f in schema
                if f.name not in SIDECAR_SKIP and not f.name.startswith("__")
            ]
        return fields

    def _sidecar_rows(self, shard: ShardSpec) -> dict[str, dict[str, Any]]:
        if not shard.sidecar_uri:
            return {}
        fs, path = get_fs(shard.sidecar_uri, self.source.storage)
        table = with_retries(lambda: pq.read_table(path, filesystem=fs), f"read {path}")
        if "key" not in table.column_names:
            log.warning("sidecar %s has no 'key' column; not joined", shard.sidecar_uri)
            return {}
        rows: dict[str, dict[str, Any]] = {}
        for row in table.to_pylist():
            key = str(row.pop("key"))
            rows[key] = {
                passthrough_name(k): v
                for k, v in row.items()
                if k not in SIDECAR_SKIP and not k.startswith("__")
            }
        return rows

    # -- reading ---------------------------------------------------------------
    def read(self, shard: ShardSpec, keys: Collection[str] | None = None) -> Iterator[RawSample]:
        for sample in self._read(shard):
            if keys is None or sample.key in keys:
                yield sample

    def _read(self, shard: ShardSpec) -> Iterator[RawSample]:
        sidecar = self._sidecar_rows(shard)
        fs, path = get_fs(shard.uri, self.source.storage)
        seen: dict[str, int] = {}
        group_key: str | None = None
        group: dict[str, bytes] = {}
        group_unsafe: list[str] = []
        where: dict[str, tarfile.TarInfo] = {}  # ext -> the member it came from

        def flush() -> Iterator[RawSample]:
            if group_key is None:
                return
            yield from self._make_rows(group_key, group, group_unsafe, seen, sidecar, where)

        # Reads resume where they were after a transient error (a reset mid-tar).
        with RetryingReader(
            lambda: fs.open(path, "rb", block_size=_READ_BLOCK), f"read {path}"
        ) as f:
            mode = "r|gz" if path.lower().endswith((".gz", ".tgz")) else "r|"
            try:
                tar = tarfile.open(fileobj=f, mode=mode)  # noqa: SIM115 - a stream, closed with f
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = stem_and_ext(member.name)
                    if key != group_key:
                        yield from flush()
                        group_key, group, group_unsafe, where = key, {}, [], {}
                    if is_unsafe(member.name):
                        # Never extracted or written anywhere: we only record the name.
                        group_unsafe.append(member.name)
                        continue
                    data = tar.extractfile(member)
                    group[ext] = data.read() if data is not None else b""
                    where[ext] = member
                yield from flush()
                group_key = None  # flushed: the damage path below must not flush it again
                _check_end_of_archive(tar)
            except (tarfile.TarError, EOFError, OSError) as e:
                from clipbatch.errors import is_transient

                if is_transient(e):
                    raise  # a network fault mid-stream: the task retries the whole shard
                yield from flush()
                yield RawSample(
                    key=f"{shard.name}/__damaged__",
                    source_member="",
                    status=SHARD_DAMAGED,
                    error=f"tar stream is damaged after {sum(seen.values())} rows: {type(e).__name__}: {e}",
                    has_caption_field=False,
                )
        # Rows listed by the sidecar but absent from the tar (img2dataset failed downloads)
        for key in sorted(set(sidecar) - set(seen)):
            yield RawSample(
                key=key,
                source_member="",
                status=MISSING_IMAGE,
                error=f"listed in {shard.sidecar_uri} but not in the tar",
                extra=dict(sidecar[key]),
            )

    def _make_rows(
        self,
        key: str,
        group: dict[str, bytes],
        unsafe: list[str],
        seen: dict[str, int],
        sidecar: dict[str, dict[str, Any]],
        where: dict[str, tarfile.TarInfo],
    ) -> Iterator[RawSample]:
        count = seen.get(key, 0)
        seen[key] = count + 1
        row_key = key if count == 0 else f"{key}#dup{count}"
        extra: dict[str, Any] = dict(sidecar.get(key, {}))
        if unsafe and not group:
            yield RawSample(
                key=row_key,
                source_member=unsafe[0],
                status=UNSAFE_PATH,
                error=f"tar member path escapes the shard: {unsafe[0]!r} (not extracted)",
                extra=extra,
                has_caption_field=False,
            )
            return
        sample = RawSample(
            key=row_key,
            source_member=key,
            extra=extra,
            has_caption_field=self.has_captions,
            has_image_field=bool(self.image_exts),
        )
        meta = None
        if "json" in group:
            meta, extra["json"] = parse_json(group["json"])
        for ext in self.image_exts:
            if ext in group:
                sample.image_bytes = group[ext]
                member = where[ext]
                sample.image_member = member.name
                sample.image_offset, sample.image_size = member.offset_data, member.size
                break
        set_caption(
            sample,
            self.source.caption_json_field,
            meta,
            self.caption_ext,
            group.get(self.caption_ext) if self.caption_ext else None,
            f"no .{self.caption_ext} member",
            f"{sample.source_member}.json",
        )
        if sample.image_bytes is None and self.image_exts:
            sample.status, sample.error = (
                MISSING_IMAGE,
                _missing_image_reason(group, self.image_exts),
            )
        if unsafe:
            sample.status, sample.error = (
                UNSAFE_PATH,
                f"tar member path escapes the shard: {unsafe[0]!r} (not extracted)",
            )
        if count:
            sample.status, sample.error = (
                DUPLICATE_KEY,
                f"key {key!r} appears {count + 1} times in the shard",
            )
        yield sample


def _check_end_of_archive(tar: tarfile.TarFile) -> None:
    """Raise when the stream did not end cleanly.

    In stream mode tarfile stops *silently* at an invalid header mid-file or at a cut
    between members, which would drop every later row unnoticed. A clean archive ends
    with a zero block followed by at least one more zero block and nothing else.
    """
    rest = 0
    while True:
        chunk = tar.fileobj.read(1 << 20)
        if not chunk:
            break
        if chunk.count(0) != len(chunk):
            raise tarfile.ReadError(
                f"invalid tar header at offset {tar.offset:,}; the data after it was not read"
            )
        rest += len(chunk)
    if rest < tarfile.BLOCKSIZE:
        raise tarfile.ReadError(
            f"the tar stops at offset {tar.offset:,} without its end-of-archive marker (truncated)"
        )


def _missing_image_reason(group: dict[str, bytes], exts: tuple[str, ...]) -> str:
    present = sorted(group)
    return f"no image member ({'/'.join(exts)}); members present: {', '.join(present) or 'none'}"
