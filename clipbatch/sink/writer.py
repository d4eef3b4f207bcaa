"""A shard's Parquet file and its commit protocol (docs/design.md §2).

A shard is written to a local temp file as row groups stream in, then staged at
``{dest}/_tmp/{run}__{host}__{pid}__{token}/{name}.parquet``, verified (rows, schema and
fingerprint locally; size and MD5 of the staged object), and moved to
``{dest}/{name}.parquet``: a rename on local disk, a server-side copy then delete on
object stores. Its commit record goes to the commit index after that
(:mod:`clipbatch.sink.commits`). A reader never sees a half-written shard, and a rerun
writes the same name, never a second copy. Staging folders are per process, so a
retried flow run (same run id) or several worker processes never share one;
:mod:`clipbatch.sink.staging` removes what crashed ones left.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import SinkConfig
from clipbatch.errors import DiskFullError, ShardVerificationError
from clipbatch.faults import crash_point
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import file_digests, get_fs, is_local_fs, move, read_parquet_metadata
from clipbatch.records import FETCH_ERROR, FETCH_TRANSIENT, RowBlock
from clipbatch.sink.commits.segments import file_version
from clipbatch.sink.layout import LOCAL_PREFIX, output_uri, staging_uri
from clipbatch.sink.members import MemberLog
from clipbatch.sink.rows import block_table
from clipbatch.sink.schema import build_schema, decode_metadata, encode_metadata

log = logging.getLogger(__name__)

FETCH_FAILURES = frozenset({FETCH_TRANSIENT, FETCH_ERROR})


class ShardWriter:
    """Streams row groups of one shard into a local temp file, then commits it."""

    def __init__(
        self,
        sink: SinkConfig,
        name: str,
        run_id: str,
        dim: int,
        passthrough: list[pa.Field],
        source_uri: str,
        source_version: str,
        metadata: dict[str, Any] | None = None,
        fingerprint: str = "",
    ) -> None:
        self.sink = sink
        self.name = name
        self.run_id = run_id
        self.dim = dim
        self.fingerprint = fingerprint
        # Lineage known at open (model, checkpoint, preprocessing, dtype, fingerprint,
        # source) goes into the Arrow schema, so pyarrow's read_schema/read_table, pandas
        # and Hugging Face datasets see it; the footer gets it again at close, with the
        # row counts known only then (pq.read_metadata, DuckDB's parquet_kv_metadata).
        self.metadata = {**(metadata or {}), "fingerprint": fingerprint}
        self.schema = build_schema(dim, sink.dtype, passthrough).with_metadata(
            encode_metadata(self.metadata)
        )
        self.passthrough = [f for f in self.schema if f.name in {p.name for p in passthrough}]
        self.source_uri = source_uri
        self.source_version = source_version
        self.rows = 0
        self.counts: dict[str, int] = {}
        self.members = MemberLog()
        # key -> runs that fetched a row's image and failed (``retry_failed`` reads it back).
        self.fetch_attempts: dict[str, int] = {}
        # The pid in the name lets a later run remove what a killed process left here.
        fd, self._local = tempfile.mkstemp(
            prefix=f"{LOCAL_PREFIX}{os.getpid()}-{name}-", suffix=".parquet"
        )
        os.close(fd)
        with self._disk_full_says_so():
            self._writer = pq.ParquetWriter(self._local, self.schema, compression="zstd")

    # -- writing ---------------------------------------------------------------
    def write(self, block: RowBlock) -> None:
        if not block.rows:
            return
        table = block_table(
            block, self.schema, self.passthrough, self.source_uri, self.source_version
        )
        with self._disk_full_says_so():
            self._writer.write_table(table, row_group_size=self.sink.row_group_size)
        self.rows += len(block.rows)
        self.members.add(block.rows)
        for r in block.rows:
            self.counts[r.raw.status] = self.counts.get(r.raw.status, 0) + 1
            if r.raw.status in FETCH_FAILURES:
                self.fetch_attempts.setdefault(r.raw.key, 1)

    def write_table(self, table: pa.Table) -> None:
        """Rows already in the table's schema (a retry carries committed rows over). Their
        image locations and fetch attempts are the caller's to set."""
        if not table.num_rows:
            return
        with self._disk_full_says_so():
            self._writer.write_table(
                table.cast(self.schema), row_group_size=self.sink.row_group_size
            )
        self.rows += table.num_rows
        for status in table.column("status").to_pylist():
            self.counts[status] = self.counts.get(status, 0) + 1

    # -- committing ------------------------------------------------------------
    def close_and_commit(self) -> tuple[str, str, str]:
        """Finish the file, stage, verify and move it.

        Returns (final uri, file sha256, file version): the version is what a listing of
        ``dest`` reports for the file (its ETag, or size+mtime locally), which the commit
        index records so that a record can only ever describe this very file.
        """
        fingerprint = self.fingerprint
        metadata = {
            **self.metadata,
            "rows": self.rows,
            "counts": dict(self.counts),
            "fetch_attempts": dict(sorted(self.fetch_attempts.items())),
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with self._disk_full_says_so():
            self._writer.add_key_value_metadata(encode_metadata(metadata))
            self._writer.close()
        try:
            sha, md5 = file_digests(self._local, ("sha256", "md5"))
            verify_parquet(self._local, None, self.rows, self.schema, fingerprint)
            crash_point("before_staging", self.name)
            final = output_uri(self.sink.url, self.name)
            staged = staging_uri(self.sink.url, self.run_id, self.name)
            fs, staged_path = get_fs(staged, self.sink.storage)
            _, final_path = get_fs(final, self.sink.storage)
            if is_local_fs(fs):
                _stage_local(self._local, staged_path)
            else:
                with_retries(lambda: fs.put_file(self._local, staged_path), f"upload {staged}")
            self._verify_staged(fs, staged_path, md5, fingerprint)
            crash_point("after_staging", self.name)
            inode = os.stat(staged_path).st_ino if is_local_fs(fs) else None
            move(fs, staged_path, final_path, self.name)
            if is_local_fs(fs):
                # Only our own folder: _tmp itself may be in use by a concurrent run.
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(staged_path))
            info = with_retries(lambda: fs.info(final_path), f"stat {final}")
            self.members.write(self.sink, self.name)
            if not self._is_ours(final, info, md5, inode):
                # A concurrent run's copy landed between our move and our stat: its
                # version is not ours to vouch for (that run records it). Ours is gone,
                # so our record is bound to a version no file will ever have.
                log.warning(
                    "shard %s: %s was replaced by a concurrent run's copy right after this "
                    "run's; this run's record is left unbound (that run's describes the file)",
                    self.name, final,
                )  # fmt: skip
                return final, sha, f"replaced:{sha}"
            return final, sha, file_version(info, fs, final_path)
        finally:
            self.discard_local()

    def _is_ours(self, final: str, info: dict[str, Any], md5: str, inode: int | None) -> bool:
        """Whether the file the stat after the move saw is the one this run moved there.

        Locally, the same inode (a rename keeps it). On stores, an ETag that is an MD5
        (what a server-side copy of an object under 5 GB gets) equal to ours; any other
        ETag (SSE-KMS, other stores): the footer's run id, one more read.
        """
        if inode is not None:
            return info.get("ino") in (None, inode)
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        if re.fullmatch(r"[0-9a-f]{32}", etag):
            return etag == md5
        meta = read_file_metadata(final, self.sink.storage) or {}
        return (meta.get("run") or {}).get("run_id") in (None, self.run_id)

    @contextlib.contextmanager
    def _disk_full_says_so(self) -> Iterator[None]:
        """A full local disk as :class:`DiskFullError`, naming the path and the free space
        (pyarrow reports it as an OSError whose message says so)."""
        try:
            yield
        except OSError as e:
            if e.errno != errno.ENOSPC and "no space left" not in str(e).lower():
                raise
            folder = os.path.dirname(self._local)
            free = shutil.disk_usage(folder).free
            raise DiskFullError(
                f"shard {self.name}: no space left on the local disk writing {self._local} "
                f"({free:,} bytes free in {folder}); free space there, or point TMPDIR at a "
                "larger disk, and rerun (committed shards are kept)"
            ) from e

    def _verify_staged(self, fs: Any, path: str, md5: str, fingerprint: str) -> None:
        """The staged object is the verified local file, byte for byte.

        One HEAD: same size, and an ETag equal to the local file's MD5 (what S3 gives a
        single-part upload) proves it. Where the ETag is something else (multipart
        uploads, SSE-KMS, other stores), read the staged footer back and check rows,
        schema and fingerprint instead.
        """
        if is_local_fs(fs):
            verify_parquet(path, fs, self.rows, self.schema, fingerprint)
            return
        try:
            info = with_retries(lambda: fs.info(path), f"stat {path}")
        except FileNotFoundError as e:
            raise ShardVerificationError(f"staged file {path} is missing after its upload") from e
        size = os.path.getsize(self._local)
        if info.get("size") is not None and int(info["size"]) != size:
            raise ShardVerificationError(
                f"staged file {path} has {info['size']} bytes, the local file {size}"
            )
        etag = str(info.get("ETag") or info.get("etag") or "").strip('"')
        if etag != md5:
            verify_parquet(path, fs, self.rows, self.schema, fingerprint)

    def abort(self) -> None:
        with contextlib.suppress(Exception):  # best effort on an error path
            self._writer.close()
        self.discard_local()

    def discard_local(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._local)


def verify_parquet(path: str, fs: Any, rows: int, schema: pa.Schema, fingerprint: str) -> None:
    """Check a written file's row count, schema and fingerprint from its footer."""
    try:
        meta = with_retries(lambda: read_parquet_metadata(fs, path), f"read footer {path}")
    except Exception as e:
        raise ShardVerificationError(f"staged file {path} is unreadable: {e}") from e
    if meta.num_rows != rows:
        raise ShardVerificationError(
            f"staged file {path} has {meta.num_rows} rows, expected {rows}"
        )
    written = meta.schema.to_arrow_schema()
    if not written.remove_metadata().equals(schema.remove_metadata()):
        raise ShardVerificationError(f"staged file {path} has schema {written}, expected {schema}")
    got = decode_metadata(meta.metadata) or {}
    if got.get("fingerprint") != fingerprint:
        raise ShardVerificationError(
            f"staged file {path} carries fingerprint {got.get('fingerprint')}"
        )


def read_file_metadata(uri: str, storage: Any = None) -> dict[str, Any] | None:
    """The ``clipbatch`` metadata of a committed file, or None if absent/unreadable."""
    fs, path = get_fs(uri, storage)
    try:
        meta = with_retries(lambda: read_parquet_metadata(fs, path), f"read footer {uri}")
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowInvalid) as e:
        log.warning("cannot read metadata of %s: %s", uri, e)
        return None
    return decode_metadata(meta.metadata)


def _stage_local(local: str, staged_path: str) -> None:
    # Another shard thread of this process removes the shared staging folder once
    # it is empty; recreate it if that happened between makedirs and open.
    for attempt in range(3):
        os.makedirs(os.path.dirname(staged_path), exist_ok=True)
        try:
            with open(local, "rb") as src, open(staged_path, "wb") as dst:
                _copy(src, dst)
                dst.flush()
                os.fsync(dst.fileno())
            return
        except FileNotFoundError:
            if attempt == 2:
                raise


def _copy(src: Any, dst: Any) -> None:
    for chunk in iter(lambda: src.read(1 << 20), b""):
        dst.write(chunk)
