"""A table row's source image, read back from its source: the bytes it was embedded from.

Where the image is depends on the source kind the file's metadata records:

- **webdataset:** the tar member ``{dest}/_members/{shard}.parquet`` names, read with one
  ranged GET of its bytes (never a scan of the tar). Tables written before ``_members/``
  existed, and ``.tar.gz`` shards (no random access), are scanned once and the member
  index is kept in memory, so later rows of the same shard cost one ranged read too
  (one read of the whole stream for a ``.tar.gz``).
- **folder:** the file ``{source_uri}/{source_member}``.
- **table:** the reference the row held (``_members/``, or the source table's row read
  again for older tables): an http(s) URL, fetched through the network guard with the
  *caller's* ``allow_networks`` (never the one the table recorded), or an object URI; or
  bytes stored in the row itself.

The bytes are checked against the row's ``image_sha256``: a source changed since the
table was written is an error (:class:`SourceChangedError`), never another image.

Example::

    from clipbatch.tables.row_images import RowImages, RowLocation

    images = RowImages(storage=None, allow_networks=())
    data = images.read(RowLocation(key="000000001", kind="webdataset", dest="/data/emb",
                                   shard="00000", source_uri="/data/wds/00000.tar",
                                   source_member="000000001", image_sha256=b"..."))
"""

from __future__ import annotations

import hashlib
import logging
import tarfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import SourceConfig, StorageOptions
from clipbatch.errors import ClipbatchError
from clipbatch.io.retry import RetryingReader, with_retries
from clipbatch.io.storage import get_fs, join
from clipbatch.records import ShardSpec
from clipbatch.sink.members import read_members
from clipbatch.sources.fetch import Fetcher
from clipbatch.sources.table import TableReader, table_format
from clipbatch.sources.webdataset import stem_and_ext

log = logging.getLogger(__name__)

COMPRESSED_TARS = (".tar.gz", ".tgz")
MAX_CACHED_SHARDS = 64  # member indexes kept in memory (a few hundred KB each)
MAX_GAP = 1 << 20  # read_many: members closer than this share one ranged read
# read_many: the most one ranged read fetches; a longer run of members is read in pieces
# of this size, at once, on read_many's threads (AWS's advice for ranged GETs: 8-16 MB).
MAX_RANGE = 8 << 20


class RowImageError(ClipbatchError):
    """A row's image cannot be read from its source; the message says why."""


class NoImageError(RowImageError):
    """The row has no image (a caption-only row, or one whose image failed)."""


class SourceChangedError(RowImageError):
    """The source's bytes are not the ones the row was embedded from."""


@dataclass(frozen=True)
class RowLocation:
    """What the table says about a row's image."""

    key: str
    kind: str  # webdataset | folder | table (the file metadata's source kind)
    dest: str  # the table the row is in (its _members/ is there)
    shard: str  # the shard name: the file's stem
    source_uri: str
    source_member: str | None
    image_sha256: bytes | None
    source_options: dict[str, Any] = field(default_factory=dict)  # as the file recorded


@dataclass(frozen=True)
class Member:
    name: str
    offset: int | None
    size: int | None


class RowImages:
    """Reads rows' source images; thread-safe, with bounded per-shard caches.

    ``storage`` is how to reach the sources (the caller's: credentials are never read
    from a table); ``allow_networks`` what URL images may reach beyond the public
    internet. ``requests`` counts object-store and HTTP reads, for tests and benchmarks.
    """

    def __init__(
        self, storage: StorageOptions | None = None, allow_networks: Sequence[str] = ()
    ) -> None:
        self.storage = storage or StorageOptions()
        self.fetcher = Fetcher(
            SourceConfig(url="-", allow_networks=tuple(allow_networks), storage=self.storage)
        )
        self._members: OrderedDict[tuple[str, str], dict[str, Member]] = OrderedDict()
        self._lock = threading.Lock()
        self.requests = 0

    def read(self, row: RowLocation) -> bytes:
        """The image bytes of ``row``, checked against its ``image_sha256``."""
        if row.image_sha256 is None:
            raise NoImageError(f"row {row.key!r} has no image (its status says why)")
        if row.kind == "webdataset":
            data = self._from_tar(row)
        elif row.kind == "folder":
            data = self._get(join(row.source_uri, row.source_member or ""))
        elif row.kind == "table":
            data = self._from_table(row)
        else:
            raise RowImageError(f"row {row.key!r}: unknown source kind {row.kind!r}")
        checked = self._checked(row, data)
        if isinstance(checked, RowImageError):
            raise checked
        return checked

    def read_many(
        self, rows: Sequence[RowLocation], threads: int = 8
    ) -> list[bytes | RowImageError]:
        """Many rows' images, in order, each checked like :meth:`read`; a row that cannot
        be read is its error, not an exception. Members of one uncompressed tar that lie
        close together come in one ranged read (a shard's kept rows, in one or a few
        GETs), so copying many rows costs about what copying their bytes does."""
        from concurrent.futures import ThreadPoolExecutor

        out: list[bytes | RowImageError | None] = [None] * len(rows)
        spans: list[tuple[str, list[tuple[int, Member]]]] = []
        singles: list[int] = []
        by_tar: dict[str, list[tuple[int, Member]]] = {}
        for i, row in enumerate(rows):
            member = None
            if row.kind == "webdataset" and row.image_sha256 is not None and not _compressed(row):
                try:
                    member = self._members_of(row, self._scan_index).get(row.key)
                except RowImageError as e:
                    out[i] = e
                    continue
            if member is None or member.offset is None or member.size is None:
                singles.append(i)
            else:
                by_tar.setdefault(row.source_uri, []).append((i, member))
        for uri, members in by_tar.items():
            members.sort(key=lambda im: im[1].offset or 0)
            span: list[tuple[int, Member]] = []
            for i, m in members:
                if span:
                    first, last = span[0][1], span[-1][1]
                    end = (last.offset or 0) + (last.size or 0)
                    if (m.offset or 0) - end > MAX_GAP or (
                        (m.offset or 0) + (m.size or 0) - (first.offset or 0) > MAX_RANGE
                    ):
                        spans.append((uri, span))
                        span = []
                span.append((i, m))
            spans.append((uri, span))

        def read_span(job: tuple[str, list[tuple[int, Member]]]) -> None:
            uri, span = job
            start = span[0][1].offset or 0
            end = max((m.offset or 0) + (m.size or 0) for _, m in span)
            fs, path = get_fs(uri, self.storage)
            try:
                self.requests += 1
                data = with_retries(lambda: fs.cat_file(path, start=start, end=end), f"read {path}")
            except OSError as e:
                for i, _ in span:
                    out[i] = RowImageError(f"row {rows[i].key!r}: {uri}: {e}")
                return
            for i, m in span:
                body = data[(m.offset or 0) - start : (m.offset or 0) - start + (m.size or 0)]
                out[i] = self._checked(rows[i], body)

        def read_single(i: int) -> None:
            try:
                out[i] = self.read(rows[i])
            except RowImageError as e:
                out[i] = e

        with ThreadPoolExecutor(max(1, threads), thread_name_prefix="row-images") as pool:
            list(pool.map(read_span, spans))
            list(pool.map(read_single, singles))
        return [o if o is not None else RowImageError("not read") for o in out]

    def _checked(self, row: RowLocation, data: bytes) -> bytes | RowImageError:
        if hashlib.sha256(data).digest() != row.image_sha256:
            return SourceChangedError(
                f"row {row.key!r}: the source's image ({len(data):,} bytes) is not the one "
                "the row was embedded from; the source changed since the table was written"
            )
        return data

    # -- webdataset ---------------------------------------------------------------------
    def _from_tar(self, row: RowLocation) -> bytes:
        member = self._members_of(row, self._scan_index).get(row.key)
        if member is None:
            raise RowImageError(f"row {row.key!r}: no image member for it in {row.source_uri}")
        if member.offset is not None and member.size is not None and not _compressed(row):
            fs, path = get_fs(row.source_uri, self.storage)
            end = member.offset + member.size
            self.requests += 1
            return with_retries(
                lambda: fs.cat_file(path, start=member.offset, end=end), f"read {path}"
            )
        return self._scan_for(row, member.name)

    def _members_of(
        self, row: RowLocation, fallback: Callable[[RowLocation], dict[str, Member]]
    ) -> dict[str, Member]:
        """The shard's ``_members/`` (one read, then cached), else ``fallback(row)``."""
        cache_key = (row.dest, row.shard)
        with self._lock:
            if cache_key in self._members:
                self._members.move_to_end(cache_key)
                return self._members[cache_key]
        table = read_members(row.dest, row.shard, self.storage)
        self.requests += 1
        members = _member_map(table) if table is not None else fallback(row)
        with self._lock:
            self._members[cache_key] = members
            while len(self._members) > MAX_CACHED_SHARDS:
                self._members.popitem(last=False)
        return members

    def _scan_index(self, row: RowLocation) -> dict[str, Member]:
        """A table written before ``_members/``: one pass over the tar's headers (a read of
        the stream), the same grouping and image-extension priority as the reader."""
        exts = tuple(row.source_options.get("image_exts") or ("jpg", "jpeg", "png", "webp"))
        log.info("indexing the members of %s (written before _members/)", row.source_uri)
        found: dict[str, dict[str, tarfile.TarInfo]] = {}
        seen: dict[str, int] = {}
        last = None
        for info in self._tar_members(row):
            stem, ext = stem_and_ext(info.name)
            if stem != last:  # a stem seen again later is a duplicate group: key#dupN
                count = seen.get(stem, 0)
                seen[stem] = count + 1
                last = stem
            key = stem if seen[stem] == 1 else f"{stem}#dup{seen[stem] - 1}"
            found.setdefault(key, {})[ext.lower()] = info
        out = {}
        for key, by_ext in found.items():
            pick = next((by_ext[e] for e in exts if e in by_ext), None)
            if pick is not None:
                out[key] = Member(pick.name, pick.offset_data, pick.size)
        return out

    def _tar_members(self, row: RowLocation) -> list[tarfile.TarInfo]:
        fs, path = get_fs(row.source_uri, self.storage)
        self.requests += 1
        with RetryingReader(lambda: fs.open(path, "rb"), f"read {path}") as f:
            mode = "r|gz" if _compressed(row) else "r|"
            with tarfile.open(fileobj=f, mode=mode) as tar:
                return [m for m in tar if m.isfile()]

    def _scan_for(self, row: RowLocation, name: str) -> bytes:
        """A compressed tar has no random access: stream it up to the member."""
        fs, path = get_fs(row.source_uri, self.storage)
        self.requests += 1
        with RetryingReader(lambda: fs.open(path, "rb"), f"read {path}") as f:
            mode = "r|gz" if _compressed(row) else "r|"
            with tarfile.open(fileobj=f, mode=mode) as tar:
                for info in tar:
                    if info.name == name:
                        data = tar.extractfile(info)
                        return data.read() if data is not None else b""
        raise RowImageError(f"row {row.key!r}: member {name!r} is not in {row.source_uri}")

    # -- tables ---------------------------------------------------------------------------
    def _from_table(self, row: RowLocation) -> bytes:
        member = self._members_of(row, lambda _: {}).get(row.key)
        if member is not None:
            return self._get(member.name)
        # Older tables, and images stored as bytes in the row: read the source row again.
        data, ref = self._table_cell(row)
        if data is not None:
            return data
        if ref is None:
            raise NoImageError(f"row {row.key!r}: its source row holds no image")
        return self._get(ref)

    def _table_cell(self, row: RowLocation) -> tuple[bytes | None, str | None]:
        options = {
            k: v
            for k, v in row.source_options.items()
            if k in SourceConfig.model_fields and k not in ("url", "storage", "allow_networks")
        }
        source = SourceConfig(url=row.source_uri, storage=self.storage, **options)
        column = source.image_column
        if not column:
            raise NoImageError(f"row {row.key!r}: the table had no image column")
        reader = TableReader(source)
        shard = ShardSpec(
            uri=row.source_uri,
            name=row.shard,
            kind="table",
            version="",
            base_uri=source.image_base_url,
        )
        index = int(row.source_member or 0)
        if table_format(row.source_uri) == "parquet":
            value = self._parquet_cell(row.source_uri, index, column)
        else:
            _, rows = reader.text_table(shard)
            cell = rows[index] if index < len(rows) else None
            value = cell.get(column) if isinstance(cell, dict) else None
        data, ref, problem = reader.image_cell(value, shard)
        if problem is not None:
            raise RowImageError(f"row {row.key!r}: {problem[1]}")
        return data, ref

    def _parquet_cell(self, uri: str, index: int, column: str) -> Any:
        fs, path = get_fs(uri, self.storage)
        self.requests += 1

        def read() -> Any:
            with fs.open(path, "rb", cache_type="none") as f:
                pf = pq.ParquetFile(f)
                start = 0
                for group in range(pf.metadata.num_row_groups):
                    n = pf.metadata.row_group(group).num_rows
                    if index < start + n:
                        cells = pf.read_row_group(group, columns=[column]).column(0)
                        return cells[index - start].as_py()
                    start += n
                return None

        return with_retries(read, f"read {path}")

    # -- one reference ------------------------------------------------------------------------
    def _get(self, ref: str) -> bytes:
        """An object URI or an http(s) URL (through the network guard)."""
        self.requests += 1
        got = self.fetcher.fetch(ref)
        if got.data is None:
            kind = "blocked" if got.status == "blocked_url" else "not readable"
            raise RowImageError(f"image {kind}: {got.error}")
        return got.data


def _member_map(table: pa.Table) -> dict[str, Member]:
    keys = table.column("key").to_pylist()
    names = table.column("member").to_pylist()
    offsets = table.column("offset").to_pylist()
    sizes = table.column("size").to_pylist()
    return {k: Member(n, o, s) for k, n, o, s in zip(keys, names, offsets, sizes, strict=True) if n}


def _compressed(row: RowLocation) -> bool:
    return row.source_uri.lower().endswith(COMPRESSED_TARS)
