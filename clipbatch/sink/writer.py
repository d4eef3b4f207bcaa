"""The Parquet sink and its commit protocol (design.md §2).

A shard is written to a local temp file as row groups stream in, then staged at
``{dest}/_tmp/{run_id}/{name}.parquet``, verified (row count, schema, fingerprint),
and moved to ``{dest}/{name}.parquet``: a rename on local disk, a server-side copy
then delete on object stores. ``_manifest.json`` is updated last. A reader never
sees a half-written shard, and a rerun writes the same name, never a second copy.

Staging folders are per process, ``_tmp/{run_id}__{host}__{pid}__{token}/``, so a
retried flow run (same run id) or several worker processes never share one. The
next run removes the staging a crashed run left, and only that: a folder whose
process is gone on this host, or whose newest object is older than
``STALE_AFTER_SECONDS`` (a live commit stages, verifies and moves within seconds of
the upload, so an hour-old staged object has no live owner). A concurrent live run's
staging is never deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import SinkConfig
from clipbatch.errors import ShardVerificationError
from clipbatch.faults import crash_point
from clipbatch.io.storage import get_fs, is_local_fs, join, move, remove_quietly, with_retries
from clipbatch.records import OK, PreparedSample
from clipbatch.sink.commits import file_version
from clipbatch.sink.schema import build_schema, decode_metadata, encode_metadata

log = logging.getLogger(__name__)

TMP_DIR = "_tmp"
STALE_AFTER_SECONDS = 3600.0
_SEP = "__"
_PROCESS_TOKEN = uuid.uuid4().hex[:8]
LOCAL_PREFIX = "clipbatch-shard-"


def output_uri(dest: str, name: str) -> str:
    return join(dest, f"{name}.parquet")


def _host() -> str:
    return socket.gethostname().replace(_SEP, "_").replace("/", "_") or "host"


def staging_id(run_id: str) -> str:
    """This process's staging folder name for ``run_id``: who owns it is in the name."""
    return _SEP.join((run_id.replace(_SEP, "_"), _host(), str(os.getpid()), _PROCESS_TOKEN))


def staging_uri(dest: str, run_id: str, name: str) -> str:
    return join(dest, TMP_DIR, staging_id(run_id), f"{name}.parquet")


@dataclass
class RowBlock:
    """Rows ready to write, with embeddings already normalised and cast."""

    rows: list[PreparedSample]
    image_embeddings: np.ndarray | None  # (n, D) with NaN rows where absent, or None
    text_embeddings: np.ndarray | None
    has_image: np.ndarray  # bool mask
    has_text: np.ndarray
    truncated: list[bool]


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
        # The pid in the name lets a later run remove what a killed process left here.
        fd, self._local = tempfile.mkstemp(
            prefix=f"{LOCAL_PREFIX}{os.getpid()}-{name}-", suffix=".parquet"
        )
        os.close(fd)
        self._writer = pq.ParquetWriter(self._local, self.schema, compression="zstd")
        self._np_dtype = np.float16 if sink.dtype == "float16" else np.float32

    # -- writing ---------------------------------------------------------------
    def write(self, block: RowBlock) -> None:
        n = len(block.rows)
        if n == 0:
            return
        cols: dict[str, Any] = {
            "key": [r.raw.key for r in block.rows],
            "source_uri": [self.source_uri] * n,
            "source_member": [r.raw.source_member for r in block.rows],
            "source_version": [self.source_version] * n,
            "caption": [r.raw.caption for r in block.rows],
            "caption_truncated": [
                (t if r.raw.caption is not None else None)
                for r, t in zip(block.rows, block.truncated, strict=True)
            ],
            "image_sha256": [r.image_sha256 for r in block.rows],
            "width": [r.width for r in block.rows],
            "height": [r.height for r in block.rows],
            "status": [r.raw.status for r in block.rows],
            "error": [r.raw.error for r in block.rows],
        }
        img = self._embedding_array(block.image_embeddings, block.has_image, n)
        txt = self._embedding_array(block.text_embeddings, block.has_text, n)
        cols["image_embedding"] = img
        cols["text_embedding"] = txt
        cols["similarity"] = self._similarity(block)
        for field in self.passthrough:
            cols[field.name] = [r.raw.extra.get(field.name) for r in block.rows]
        arrays = []
        for field in self.schema:
            value = cols[field.name]
            arrays.append(
                value if isinstance(value, pa.Array) else pa.array(value, type=field.type)
            )
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        self._writer.write_table(table, row_group_size=self.sink.row_group_size)
        self.rows += n
        for r in block.rows:
            self.counts[r.raw.status] = self.counts.get(r.raw.status, 0) + 1

    def _embedding_array(self, emb: np.ndarray | None, mask: np.ndarray, n: int) -> pa.Array:
        typ = self.schema.field("image_embedding").type
        if emb is None or not mask.any():
            return pa.nulls(n, type=typ)
        values = pa.array(np.ascontiguousarray(emb, dtype=self._np_dtype).reshape(-1))
        arr = pa.FixedSizeListArray.from_arrays(values, self.dim)
        return (
            pa.FixedSizeListArray.from_arrays(values, self.dim, mask=pa.array(~mask))
            if not mask.all()
            else arr
        )

    def _similarity(self, block: RowBlock) -> pa.Array:
        n = len(block.rows)
        both = block.has_image & block.has_text
        if block.image_embeddings is None or block.text_embeddings is None or not both.any():
            return pa.nulls(n, type=pa.float32())
        a = block.image_embeddings.astype(np.float32)
        b = block.text_embeddings.astype(np.float32)
        sim = (a * b).sum(1) / np.maximum(
            np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12
        )
        return pa.array(sim.astype(np.float32), mask=~both)

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
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        self._writer.add_key_value_metadata(encode_metadata(metadata))
        self._writer.close()
        try:
            sha, md5 = _file_digests(self._local)
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
            move(fs, staged_path, final_path, self.name)
            if is_local_fs(fs):
                # Only our own folder: _tmp itself may be in use by a concurrent run.
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(staged_path))
            info = with_retries(lambda: fs.info(final_path), f"stat {final}")
            return final, sha, file_version(info, fs, final_path)
        finally:
            self.discard_local()

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
        meta = with_retries(lambda: pq.read_metadata(path, filesystem=fs), f"read footer {path}")
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
        meta = with_retries(lambda: pq.read_metadata(path, filesystem=fs), f"read footer {uri}")
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowInvalid) as e:
        log.warning("cannot read metadata of %s: %s", uri, e)
        return None
    return decode_metadata(meta.metadata)


def clean_staging(
    sink: SinkConfig, keep_run: str | None = None, stale_after: float = STALE_AFTER_SECONDS
) -> int:
    """Remove ``_tmp/`` folders left by crashed runs; keep live ones. Returns how many went."""
    clean_local_temp()
    fs, root = get_fs(join(sink.url, TMP_DIR), sink.storage)
    try:
        entries = with_retries(lambda: fs.ls(root, detail=True), f"list {root}")
    except FileNotFoundError:
        return 0
    removed = 0
    for entry in entries:
        path = entry["name"].rstrip("/")
        folder = path.rsplit("/", 1)[-1]
        if keep_run and folder.split(_SEP, 1)[0] == keep_run and _owner_alive(folder):
            continue
        reason = _stale_reason(fs, path, folder, stale_after)
        if reason is None:
            log.info("leaving %s: it belongs to a live run", path)
            continue
        log.info("removing stale staging %s (%s)", path, reason)
        remove_quietly(fs, path, recursive=True)
        removed += 1
    return removed


def clean_local_temp(directory: str | None = None) -> int:
    """Remove this host's local shard temp files whose process is gone (SIGKILL, OOM kill)."""
    directory = directory or tempfile.gettempdir()
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            rest = entry.name[len(LOCAL_PREFIX) :]
            pid = rest.split("-", 1)[0]
            if entry.name.startswith(LOCAL_PREFIX) and pid.isdigit() and not _pid_alive(int(pid)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)
                    removed += 1
    return removed


def _owner_alive(folder: str) -> bool | None:
    """True/False when the folder's owner is a process on this host; None if unknown."""
    parts = folder.split(_SEP)
    if len(parts) != 4 or parts[1] != _host() or not parts[2].isdigit():
        return None
    return _pid_alive(int(parts[2]))


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        import psutil

        return psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except ImportError:
        pass
    except Exception:  # the process vanished while we looked
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale_reason(fs: Any, path: str, folder: str, stale_after: float) -> str | None:
    alive = _owner_alive(folder)
    if alive is False:
        return "its process has exited"
    if alive:
        return None
    try:
        infos = with_retries(lambda: fs.find(path, detail=True), f"list {path}")
    except FileNotFoundError:
        return "empty"
    if isinstance(infos, dict):
        infos = list(infos.values())
    if not infos:
        return "empty"
    newest = max(_mtime(i) for i in infos)
    age = time.time() - newest
    return f"untouched for {age:.0f}s" if age > stale_after else None


def _mtime(info: dict[str, Any]) -> float:
    for key in ("mtime", "LastModified", "last_modified", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        with contextlib.suppress(TypeError, ValueError):
            return float(value)
    return time.time()  # unknown age: treat as fresh, never delete what may be live


def ok_count(counts: dict[str, int]) -> int:
    return counts.get(OK, 0)


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


def _file_digests(path: str) -> tuple[str, str]:
    """(sha256, md5) of a file, in one pass: the sha256 is recorded, the md5 is what an
    object store's ETag of a single-part upload is."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
            md5.update(chunk)
    return sha.hexdigest(), md5.hexdigest()


def _copy(src: Any, dst: Any) -> None:
    for chunk in iter(lambda: src.read(1 << 20), b""):
        dst.write(chunk)
