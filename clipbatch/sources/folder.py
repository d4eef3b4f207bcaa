"""Image folders with sidecar captions: ``a/b/x.jpg`` + ``a/b/x.txt`` + ``a/b/x.json``.

The folder is listed recursively once. Every stem (relative path without extension)
that has an image or a caption file is one row, keyed by that stem, so an orphan
caption is a ``missing_image`` row and nothing is silently dropped. Rows are sorted by
stem and cut into deterministic slices of ``folder_shard_size``: ``folder-00000``,
``folder-00001``, ... Each :class:`ShardSpec` lists its member files (images and
sidecars) and its version hashes their versions, so editing one caption redoes only
the slice that holds it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Collection, Iterator
from typing import Any

import pyarrow as pa

from clipbatch.config import SourceConfig
from clipbatch.errors import ConfigError
from clipbatch.io.storage import get_fs, to_uri
from clipbatch.records import DUPLICATE_KEY, MISSING_IMAGE, RawSample, ShardSpec
from clipbatch.sources.fetch import Fetcher
from clipbatch.sources.listing import Listing, filter_suffixes, list_source_url
from clipbatch.sources.text import parse_json, set_caption

log = logging.getLogger(__name__)

SHARD_PREFIX = "folder"
_READ_CHUNK = 64  # rows whose files are fetched together


def split_name(rel: str) -> tuple[str, str]:
    """('a/b/x', 'jpg') for 'a/b/x.JPG': the stem keeps inner dots of the basename."""
    directory, _, base = rel.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    if not dot:
        stem, ext = base, ""
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


class FolderReader:
    kind = "folder"

    def __init__(self, source: SourceConfig) -> None:
        self.source = source
        self.image_exts = tuple(e.lower().lstrip(".") for e in source.image_exts)
        self.caption_ext = source.caption_ext.lower().lstrip(".") if source.caption_ext else None
        self.fetcher = Fetcher(source)

    # -- listing ---------------------------------------------------------------
    def list_shards(self) -> list[ShardSpec]:
        """List the source and cut it into shards (ad-hoc use; the plan lists once)."""
        return self.shards_from(list_source_url(self.source))

    def shards_from(self, listing: Listing) -> list[ShardSpec]:
        fs = listing.fs
        _, root = get_fs(self.source.url, self.source.storage)
        root = root.rstrip("/")
        wanted = (
            set(self.image_exts) | {"json"} | ({self.caption_ext} if self.caption_ext else set())
        )
        files = filter_suffixes(listing.matches, tuple(f".{e}" for e in sorted(wanted)))
        by_stem: dict[str, dict[str, tuple[str, str]]] = {}
        for info in files:
            path = info.path
            rel = path[len(root) :].lstrip("/") if path.startswith(root) else path
            stem, ext = split_name(rel)
            by_stem.setdefault(stem, {})[ext] = (rel, info.version)
        primary = set(self.image_exts) | ({self.caption_ext} if self.caption_ext else set())
        stems = sorted(s for s, exts in by_stem.items() if primary & set(exts))
        if not stems:
            raise ConfigError(
                f"folder source {self.source.url!r} has no images ({', '.join(self.image_exts)})"
                f"{' or captions' if self.caption_ext else ''}; check the URL and image_exts"
            )
        size = self.source.folder_shard_size
        folder_uri = to_uri(fs, root)
        shards = []
        for i in range(0, len(stems), size):
            members: list[str] = []
            digest = hashlib.sha256()
            for stem in stems[i : i + size]:
                for _ext, (rel, version) in sorted(by_stem[stem].items()):
                    members.append(rel)
                    digest.update(f"{rel}\0{version}\n".encode())
            shards.append(
                ShardSpec(
                    uri=folder_uri,
                    name=f"{SHARD_PREFIX}-{i // size:05d}",
                    kind=self.kind,
                    version=f"sha256:{digest.hexdigest()}",
                    members=tuple(members),
                )
            )
        return shards

    # -- schema ----------------------------------------------------------------
    def passthrough_fields(self, shard: ShardSpec) -> list[pa.Field]:
        return [pa.field("json", pa.string())]

    # -- reading ---------------------------------------------------------------
    def read(self, shard: ShardSpec, keys: Collection[str] | None = None) -> Iterator[RawSample]:
        groups: dict[str, dict[str, str]] = {}
        for rel in shard.members:
            stem, ext = split_name(rel)
            groups.setdefault(stem, {})[ext] = rel
        stems = sorted(groups)
        if keys is not None:  # a key is its stem, or stem#dupN for a second image
            wanted = {k.split("#dup", 1)[0] for k in keys}
            stems = [s for s in stems if s in wanted]
        base = shard.uri.rstrip("/")
        for i in range(0, len(stems), _READ_CHUNK):
            chunk = stems[i : i + _READ_CHUNK]
            refs = [f"{base}/{rel}" for stem in chunk for rel in groups[stem].values()]
            fetched = dict(zip(refs, self.fetcher.fetch_many(refs), strict=True))
            for stem in chunk:
                files = {ext: (rel, fetched[f"{base}/{rel}"]) for ext, rel in groups[stem].items()}
                for sample in self._rows(stem, files):
                    if keys is None or sample.key in keys:
                        yield sample

    def _rows(self, stem: str, files: dict[str, tuple[str, Any]]) -> Iterator[RawSample]:
        images = [e for e in self.image_exts if e in files]
        member = files[images[0]][0] if images else next(iter(files.values()))[0]
        sample = RawSample(
            key=stem,
            source_member=member,
            has_caption_field=self.caption_ext is not None or bool(self.source.caption_json_field),
            has_image_field=bool(self.image_exts),
        )
        meta = self._json(files, sample)
        self._set_caption(sample, files, meta)
        if images:
            rel, got = files[images[0]]
            sample.image_member = rel  # relative to the shard's folder (source_uri)
            if got.data is not None:
                sample.image_bytes = got.data
            else:
                sample.status, sample.error = got.status, got.error
        elif self.image_exts:
            sample.status, sample.error = (
                MISSING_IMAGE,
                f"no image beside {member} ({'/'.join(self.image_exts)})",
            )
        yield sample
        # A second image with the same stem (x.jpg and x.png) is a duplicate key: keep
        # its row, flagged, rather than drop it.
        for n, ext in enumerate(images[1:], start=1):
            rel, got = files[ext]
            yield RawSample(
                key=f"{stem}#dup{n}",
                source_member=rel,
                image_bytes=got.data,
                caption=sample.caption,
                status=DUPLICATE_KEY,
                error=f"stem {stem!r} has {len(images)} images ({', '.join(images)})",
                extra=dict(sample.extra),
            )

    def _json(self, files: dict[str, tuple[str, Any]], sample: RawSample) -> Any:
        if "json" not in files:
            return None
        _, got = files["json"]
        if got.data is None:
            sample.extra["json"] = None
            return None
        meta, sample.extra["json"] = parse_json(got.data)
        return meta

    def _set_caption(self, sample: RawSample, files: dict[str, tuple[str, Any]], meta: Any) -> None:
        got = files[self.caption_ext][1] if self.caption_ext in files else None
        set_caption(
            sample,
            self.source.caption_json_field,
            meta,
            self.caption_ext,
            got.data if got is not None else None,
            got.error if got is not None else f"no .{self.caption_ext} file",
            "the .json",
        )
