"""``{dest}/_members/{shard}.parquet``: where each row's image is in its source.

A WebDataset row's ``source_member`` is its group stem, so the image member's name and
its byte range in the tar are recorded here; a table row's image reference (URL or
object URI) too. With them, showing a row's source image is one ranged read of the
shard, never a scan of the tar. Written after the shard file is committed, in one PUT
(whole or not at all); a crash between the two leaves a shard without it, and readers
fall back to scanning the tar. No column and no fingerprint changes: tables written
before it stay as they are.
"""

from __future__ import annotations

import io
import logging

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import SinkConfig, StorageOptions
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs, write_bytes_atomic
from clipbatch.records import PreparedSample
from clipbatch.sink.layout import members_uri

log = logging.getLogger(__name__)

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("member", pa.string()),  # tar member name, or the reference a table row holds
        pa.field("offset", pa.int64()),  # the member's data offset in an uncompressed tar
        pa.field("size", pa.int64()),
    ]
)


class MemberLog:
    """The image locations of one shard's rows, collected as they are written."""

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.members: list[str | None] = []
        self.offsets: list[int | None] = []
        self.sizes: list[int | None] = []

    def add(self, rows: list[PreparedSample]) -> None:
        for r in rows:
            raw = r.raw
            if raw.image_member is None:
                continue
            self.keys.append(raw.key)
            self.members.append(raw.image_member)
            self.offsets.append(raw.image_offset)
            self.sizes.append(raw.image_size)

    def add_table(self, table: pa.Table) -> None:
        """Entries read back from a shard's ``_members/`` (rows a retry carries over)."""
        self.keys += table.column("key").to_pylist()
        self.members += table.column("member").to_pylist()
        self.offsets += table.column("offset").to_pylist()
        self.sizes += table.column("size").to_pylist()

    def __len__(self) -> int:
        return len(self.keys)

    def table(self) -> pa.Table:
        return pa.table(
            {"key": self.keys, "member": self.members, "offset": self.offsets, "size": self.sizes},
            schema=SCHEMA,
        )

    def write(self, sink: SinkConfig, shard: str) -> None:
        """One atomic write; nothing when no row has a recorded image location."""
        if not self.keys:
            return
        buf = io.BytesIO()
        pq.write_table(self.table(), buf, compression="zstd")
        fs, path = get_fs(members_uri(sink.url, shard), sink.storage)
        write_bytes_atomic(fs, path, buf.getvalue())


def read_members(dest: str, shard: str, storage: StorageOptions | None = None) -> pa.Table | None:
    """A shard's image locations, or None when the table has none for it (written before
    ``_members/`` existed, or a crash between the shard's commit and this file)."""
    fs, path = get_fs(members_uri(dest, shard), storage)
    try:
        data = with_retries(lambda: fs.cat_file(path), f"read {path}")
    except FileNotFoundError:
        return None
    return pq.read_table(pa.BufferReader(data))
