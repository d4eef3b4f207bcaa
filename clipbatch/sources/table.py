"""Tables of rows: Parquet, CSV or JSONL (docs/design.md §1).

A shard is one file, or, for Parquet with ``table_shard_rows``, a range of whole row
groups of it (``{stem}-00000``, ``{stem}-00001``, ...). Each row has:

- an image column: a relative path (resolved against ``image_base_url`` or the table's
  folder), an s3:// or other fsspec URI, an http(s):// URL, raw bytes, or the Hugging
  Face ``{bytes, path}`` struct. Referenced images are fetched concurrently, with
  timeouts and retries (:mod:`clipbatch.sources.fetch`); a failed fetch is a row status;
- a caption column; an optional key column (``source.key_column``, else a column named
  ``key`` when the table has one, else the key is ``{shard}/{row}``);
- passthrough columns. Parquet keeps its column types. CSV and JSONL have no schema
  to keep stable across files, so their passthrough columns are strings (nested JSON
  values as JSON text): every output file of a dataset then has the same schema.

Parquet is streamed batch by batch. CSV and JSONL files are read whole (split big ones
into several files), decoded with ``surrogateescape`` so one bad byte spoils one cell,
not the file.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import posixpath
from collections.abc import Collection, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import SourceConfig
from clipbatch.errors import ConfigError, SourceError
from clipbatch.io.retry import RetryingReader, with_retries
from clipbatch.io.storage import get_fs, is_local, read_parquet_metadata, to_uri
from clipbatch.records import (
    BAD_ROW,
    DUPLICATE_KEY,
    MISSING_IMAGE,
    UNSAFE_PATH,
    RawSample,
    ShardSpec,
    passthrough_name,
)
from clipbatch.sources.base import check_unique_names
from clipbatch.sources.detect import TABLE_SUFFIXES
from clipbatch.sources.fetch import Fetcher
from clipbatch.sources.listing import Listing, filter_suffixes, list_source_url
from clipbatch.sources.text import caption_from_value

log = logging.getLogger(__name__)

_BATCH_ROWS = 256
# The key when source.key_column is not set and the table has a column of this name.
DEFAULT_KEY_COLUMN = "key"


def table_format(path: str) -> str:
    p = path.lower().removesuffix(".gz")
    if p.endswith(".parquet"):
        return "parquet"
    if p.endswith(".csv"):
        return "csv"
    if p.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise ConfigError(f"{path}: not a Parquet, CSV or JSONL table")


def _stem(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    for suffix in sorted(TABLE_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0]


class TableReader:
    kind = "table"

    def __init__(self, source: SourceConfig) -> None:
        self.source = source
        self.fetcher = Fetcher(source)
        self._text_rows: dict[str, tuple[list[str], list[dict[str, Any] | str]]] = {}
        self._schemas: dict[str, pa.Schema] = {}

    # -- listing ---------------------------------------------------------------
    def list_shards(self) -> list[ShardSpec]:
        """List the source and make its shards (ad-hoc use; the plan lists once)."""
        return self.shards_from(list_source_url(self.source))

    def shards_from(self, listing: Listing) -> list[ShardSpec]:
        fs = listing.fs
        files = [
            info
            for info in filter_suffixes(listing.matches, TABLE_SUFFIXES)
            if not info.path.lower().endswith(".json")  # folder-style sidecars, not tables
        ]
        shards: list[ShardSpec] = []
        for info in files:
            p = info.path
            uri = to_uri(fs, p)
            version = info.version
            base = self.source.image_base_url or uri.rsplit("/", 1)[0]
            stem = _stem(p)
            ranges = self._row_ranges(fs, p) if table_format(p) == "parquet" else None
            if not ranges:
                shards.append(ShardSpec(uri, stem, self.kind, version, base_uri=base))
                continue
            for i, rng in enumerate(ranges):
                shards.append(
                    ShardSpec(
                        uri, f"{stem}-{i:05d}", self.kind, version, row_range=rng, base_uri=base
                    )
                )
        if not shards:
            raise ConfigError(
                f"table source {self.source.url!r} has no Parquet, CSV or JSONL files"
            )
        check_unique_names(shards)
        return shards

    def _row_ranges(self, fs: Any, path: str) -> list[tuple[int, int]] | None:
        per_shard = self.source.table_shard_rows
        if not per_shard:
            return None
        meta = with_retries(lambda: read_parquet_metadata(fs, path), f"read {path}")
        if meta.num_rows <= per_shard:
            return None
        ranges, start, stop = [], 0, 0
        for i in range(meta.num_row_groups):
            stop += meta.row_group(i).num_rows
            if stop - start >= per_shard:
                ranges.append((start, stop))
                start = stop
        if stop > start:
            ranges.append((start, stop))
        return ranges

    # -- schema ----------------------------------------------------------------
    def _parquet_schema(self, shard: ShardSpec) -> pa.Schema:
        if shard.uri not in self._schemas:
            fs, path = get_fs(shard.uri, self.source.storage)
            self._schemas[shard.uri] = with_retries(
                lambda: read_parquet_metadata(fs, path).schema.to_arrow_schema(), f"read {path}"
            )
        return self._schemas[shard.uri]

    def _column_names(self, shard: ShardSpec) -> list[str]:
        if table_format(shard.uri) == "parquet":
            return list(self._parquet_schema(shard).names)
        return list(self.text_table(shard)[0])

    def key_column(self, shard: ShardSpec) -> str | None:
        """``source.key_column``, else a column named ``key`` when the table has one."""
        if self.source.key_column:
            return self.source.key_column
        return DEFAULT_KEY_COLUMN if DEFAULT_KEY_COLUMN in self._column_names(shard) else None

    def _consumed(self, shard: ShardSpec) -> set[str]:
        return {c for c in (self.source.caption_column, self.key_column(shard)) if c}

    def passthrough_fields(self, shard: ShardSpec) -> list[pa.Field]:
        consumed = self._consumed(shard)
        image_col = self.source.image_column
        if table_format(shard.uri) == "parquet":
            schema = self._parquet_schema(shard)
            fields = []
            for f in schema:
                if f.name in consumed or f.name.startswith("__"):
                    continue
                if f.name == image_col and not pa.types.is_string(f.type):
                    continue  # bytes or {bytes, path}: the image itself, not metadata
                fields.append(pa.field(passthrough_name(f.name), f.type))
            return fields
        names, _ = self.text_table(shard)
        return [pa.field(passthrough_name(n), pa.string()) for n in names if n not in consumed]

    # -- reading ---------------------------------------------------------------
    def read(self, shard: ShardSpec, keys: Collection[str] | None = None) -> Iterator[RawSample]:
        self._check_columns(shard)
        seen: dict[str, int] = {}
        samples = (self._sample(shard, index, row, seen) for index, row in self._rows(shard))
        if keys is not None:  # keys are given after every row's dedupe, so all are parsed
            samples = (s for s in samples if s[0].key in keys)
        for sample, got in self.fetcher.fetch_ordered(samples):
            if got is not None:
                if got.data is not None:
                    sample.image_bytes = got.data
                else:
                    sample.status, sample.error = got.status, got.error
            yield sample
        self._text_rows.pop(shard.uri, None)

    def _check_columns(self, shard: ShardSpec) -> None:
        if table_format(shard.uri) == "parquet":
            names = set(self._parquet_schema(shard).names)
        else:
            names = set(self.text_table(shard)[0])
            if table_format(shard.uri) == "jsonl":
                return  # JSON objects may omit keys; a missing field is a row status
        wanted = {
            "image_column": self.source.image_column,
            "caption_column": self.source.caption_column,
            "key_column": self.source.key_column,
        }
        for option, column in wanted.items():
            if column and column not in names:
                raise ConfigError(
                    f"{shard.uri} has no column {column!r} (source.{option}); its columns are "
                    f"{sorted(names)}; set source.{option} (null if the dataset has none)"
                )

    def _rows(self, shard: ShardSpec) -> Iterator[tuple[int, dict[str, Any] | str]]:
        if table_format(shard.uri) != "parquet":
            _, rows = self.text_table(shard)
            yield from enumerate(rows)
            return
        fs, path = get_fs(shard.uri, self.source.storage)
        with RetryingReader(lambda: fs.open(path, "rb"), f"read {path}") as f:
            pf = pq.ParquetFile(f)
            groups, first = self._groups(pf, shard.row_range)
            index = first
            for record_batch in pf.iter_batches(batch_size=_BATCH_ROWS, row_groups=groups):
                for row in record_batch.to_pylist():
                    yield index, row
                    index += 1

    @staticmethod
    def _groups(pf: pq.ParquetFile, row_range: tuple[int, int] | None) -> tuple[list[int], int]:
        meta = pf.metadata
        if row_range is None:
            return list(range(meta.num_row_groups)), 0
        groups, start = [], 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            if row_range[0] <= start < row_range[1]:
                groups.append(i)
            start += n
        first = row_range[0]
        return groups, first

    def text_table(self, shard: ShardSpec) -> tuple[list[str], list[dict[str, Any] | str]]:
        """(column names, rows) of a CSV/JSONL shard; a row that cannot be parsed is a str."""
        if shard.uri in self._text_rows:
            return self._text_rows[shard.uri]
        fs, path = get_fs(shard.uri, self.source.storage)
        raw = with_retries(
            lambda: fs.cat_file(path) if not path.lower().endswith(".gz") else _gunzip(fs, path),
            f"read {path}",
        )
        text = raw.decode("utf-8-sig", "surrogateescape")
        parsed = _parse_csv(text, path) if table_format(path) == "csv" else _parse_jsonl(text)
        self._text_rows = {shard.uri: parsed}  # one file at a time: bounded memory
        return parsed

    def _sample(
        self, shard: ShardSpec, index: int, row: dict[str, Any] | str, seen: dict[str, int]
    ) -> tuple[RawSample, str | None]:
        src = self.source
        default_key = f"{shard.name.rsplit('-', 1)[0] if shard.row_range else shard.name}/{index}"
        if isinstance(row, str):  # unparseable line or ragged row
            return (
                RawSample(
                    key=_dedupe(default_key, seen)[0],
                    source_member=str(index),
                    status=BAD_ROW,
                    error=row,
                    has_caption_field=bool(src.caption_column),
                    has_image_field=bool(src.image_column),
                ),
                None,
            )
        key_column = self.key_column(shard)
        key_value = row.get(key_column) if key_column else None
        base_key = default_key if key_value in (None, "") else str(key_value)
        key, count = _dedupe(base_key, seen)
        consumed = self._consumed(shard)
        extra = {
            passthrough_name(k): _passthrough(v, shard)
            for k, v in row.items()
            if k not in consumed and not (k == src.image_column and not isinstance(v, str))
        }
        sample = RawSample(
            key=key,
            source_member=str(index),
            extra=extra,
            has_caption_field=bool(src.caption_column),
            has_image_field=bool(src.image_column),
        )
        if src.caption_column:
            sample.caption, problem = caption_from_value(row.get(src.caption_column))
            if problem:
                sample.status, sample.error = problem
        ref: str | None = None
        if src.image_column:
            data, ref, problem = self.image_cell(row.get(src.image_column), shard)
            sample.image_bytes, sample.image_uri = data, ref
            sample.image_member = ref  # None when the image is bytes in the row
            if problem:
                sample.status, sample.error = problem
        if count:
            sample.status, sample.error = (
                DUPLICATE_KEY,
                f"key {base_key!r} appears {count + 1} times in the shard",
            )
            ref = None  # its row carries no embedding, so the image is not fetched
        return sample, ref

    def image_cell(
        self, value: Any, shard: ShardSpec
    ) -> tuple[bytes | None, str | None, tuple[str, str] | None]:
        """(bytes, reference to fetch, problem) for one image cell (also what a server
        showing a row of an older table reads again)."""
        if isinstance(value, dict):  # Hugging Face Image feature: {bytes, path}
            if value.get("bytes") is not None:
                data = value["bytes"]
                return (_b64(data) if isinstance(data, str) else bytes(data)), None, None
            value = value.get("path")
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value), None, None  # empty bytes: decode says "zero-byte image"
        if value is None or (isinstance(value, str) and not value.strip()):
            return (
                None,
                None,
                (MISSING_IMAGE, f"no value in image column {self.source.image_column!r}"),
            )
        if not isinstance(value, str):
            return None, None, (BAD_ROW, f"image cell has type {type(value).__name__}, not a path")
        ref = self._resolve(value.strip(), shard)
        if is_local(ref) and not is_local(shard.base_uri or shard.uri):
            # A table in object storage must not make a worker read its own disk.
            return None, None, (UNSAFE_PATH, f"a remote table may not reference local file {ref!r}")
        return None, ref, None

    @staticmethod
    def _resolve(ref: str, shard: ShardSpec) -> str:
        if "://" in ref or ref.startswith("/"):
            return ref
        base = (shard.base_uri or shard.uri.rsplit("/", 1)[0]).rstrip("/")
        if "://" in base:
            scheme, rest = base.split("://", 1)
            return f"{scheme}://{posixpath.normpath(f'{rest}/{ref}')}"
        return posixpath.normpath(f"{base}/{ref}")


def _dedupe(key: str, seen: dict[str, int]) -> tuple[str, int]:
    count = seen.get(key, 0)
    seen[key] = count + 1
    return (key if count == 0 else f"{key}#dup{count}"), count


def _passthrough(value: Any, shard: ShardSpec) -> Any:
    if table_format(shard.uri) == "parquet" or value is None or isinstance(value, str):
        return _clean_text(value) if isinstance(value, str) else value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _clean_text(value: str) -> str:
    # Undecodable bytes (surrogateescape) cannot be written as UTF-8: show them as U+FFFD.
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _b64(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        return data.encode("utf-8", "surrogateescape")


def _gunzip(fs: Any, path: str) -> bytes:
    import gzip

    return gzip.decompress(fs.cat_file(path))


def _parse_csv(text: str, path: str) -> tuple[list[str], list[dict[str, Any] | str]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        return [], []
    except csv.Error as e:
        raise SourceError(f"{path}: cannot read the CSV header: {e}") from e
    names = [_clean_text(h).strip() for h in header]
    rows: list[dict[str, Any] | str] = []
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            rows.append(f"CSV row {reader.line_num} cannot be parsed: {e}")
            continue
        if not cells:
            continue
        if len(cells) != len(names):
            rows.append(
                f"CSV row at line {reader.line_num} has {len(cells)} fields, the header {len(names)}"
            )
            continue
        rows.append(dict(zip(names, cells, strict=True)))
    return names, rows


def _parse_jsonl(text: str) -> tuple[list[str], list[dict[str, Any] | str]]:
    names: dict[str, None] = {}
    rows: list[dict[str, Any] | str] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            rows.append(f"JSONL line {n} is not JSON: {e}")
            continue
        if not isinstance(obj, dict):
            rows.append(f"JSONL line {n} is a {type(obj).__name__}, not an object")
            continue
        names.update(dict.fromkeys(obj))
        rows.append(obj)
    return list(names), rows
