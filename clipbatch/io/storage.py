"""Object-storage access over fsspec: filesystems, versions, retries, atomic writes.

Every I/O call that can fail transiently goes through
:func:`clipbatch.io.retry.with_retries`, the storage layer's one retry policy. Secrets
never pass through here as arguments: s3fs/botocore read them from the environment, a
profile, or credentials registered from a Prefect block.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from typing import Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

from clipbatch.config import StorageOptions
from clipbatch.errors import ConfigError
from clipbatch.faults import crash_point
from clipbatch.io.credentials import lookup
from clipbatch.io.retry import with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")

LOCAL_PROTOCOLS = {"file", "local"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def protocol_of(url: str) -> str:
    if "://" not in url:
        return "file"
    return url.split("://", 1)[0].lower()


def is_local(url: str) -> bool:
    return protocol_of(url) in LOCAL_PROTOCOLS


def has_scheme(url: str) -> bool:
    """``s3://b/k``, ``file:///x``, ``https://h/p``: a URL rather than a plain path."""
    return bool(_SCHEME.match(url))


def is_http_url(url: str) -> bool:
    """An ``http://`` or ``https://`` URL (fetched over HTTP, through the network guard)."""
    return protocol_of(url) in ("http", "https")


def fsspec_kwargs(storage: StorageOptions, protocol: str) -> dict[str, Any]:
    """Translate to the keyword arguments fsspec's filesystem for ``protocol`` takes."""
    kwargs: dict[str, Any] = dict(storage.extra)
    if protocol in ("s3", "s3a"):
        # Listings decide what is done and what to skip; a cached listing from an
        # earlier run in the same process would be stale.
        kwargs.setdefault("use_listings_cache", False)
        # One retry layer for storage calls: clipbatch's (clipbatch.io.retry). botocore
        # makes one attempt (and s3fs too: clipbatch.io.storage.get_fs), so attempts
        # never multiply. total_max_attempts, not max_attempts: botocore reads the
        # latter as retries (max_attempts=1 is two requests, with its own backoff).
        config_kwargs = dict(kwargs.pop("config_kwargs", {}))
        config_kwargs.setdefault("retries", {"total_max_attempts": 1, "mode": "standard"})
        kwargs["config_kwargs"] = config_kwargs
        client_kwargs = dict(kwargs.pop("client_kwargs", {}))
        if storage.endpoint_url:
            kwargs["endpoint_url"] = storage.endpoint_url
        if storage.region:
            client_kwargs["region_name"] = storage.region
        if storage.profile:
            kwargs["profile"] = storage.profile
        if storage.anon:
            kwargs["anon"] = True
        if storage.credentials_block:
            creds = lookup(storage.credentials_block)
            kwargs.update(creds.s3_kwargs())
            if creds.endpoint_url and not storage.endpoint_url:
                kwargs["endpoint_url"] = creds.endpoint_url
            if creds.region and not storage.region:
                client_kwargs["region_name"] = creds.region
        if client_kwargs:
            kwargs["client_kwargs"] = client_kwargs
    elif storage.anon:
        kwargs["anon"] = True
    return kwargs


def get_fs(
    url: str, storage: StorageOptions | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path for ``url``; raises :class:`ConfigError` on unknown schemes."""
    storage = storage or StorageOptions()
    try:
        fs, path = url_to_fs(url, **fsspec_kwargs(storage, protocol_of(url)))
    except (ImportError, ValueError) as e:
        raise ConfigError(f"cannot open {url!r}: {e}") from e
    if hasattr(fs, "retries") and protocol_of(url) in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own retry loop, off: clipbatch.io.retry is the one layer
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the scheme."""
    out = base.rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A full URI for ``path`` on ``fs`` (fsspec drops the scheme from paths)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in LOCAL_PROTOCOLS:
        return os.path.abspath(path)
    return f"{protocol}://{path}"


def object_version(
    fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any] | None = None
) -> str:
    """A version string for an object: version id or ETag on stores, size+mtime locally."""
    info = info if info is not None else with_retries(lambda: fs.info(path), f"stat {path}")
    for key in ("VersionId", "version_id", "generation"):
        if info.get(key):
            return f"{key.lower()}:{info[key]}"
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return f"etag:{str(info[key]).strip(chr(34))}"
    mtime = (
        info.get("mtime")
        or info.get("LastModified")
        or info.get("last_modified")
        or info.get("created")
    )
    if hasattr(mtime, "timestamp"):
        mtime = mtime.timestamp()
    return f"size:{info.get('size')}:mtime:{mtime}"


def check_writable(url: str, storage: StorageOptions | None = None) -> None:
    """Fail fast, naming the path, when a local destination cannot be written.

    Object stores say so on the first write (a permission error is not retried).
    """
    if not is_local(url):
        return
    _, path = get_fs(url, storage)
    probe = os.path.join(path, f".clipbatch-write-test-{uuid.uuid4().hex[:8]}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "wb"):
            pass
        os.remove(probe)
    except OSError as e:
        where = e.filename or path
        raise ConfigError(
            f"destination {url!r} is not writable ({where}: {e.strerror or e}); choose "
            "another --dest, or one this user may write"
        ) from e


def file_digests(
    path: str | os.PathLike, algorithms: tuple[str, ...] = ("sha256",)
) -> tuple[str, ...]:
    """Hex digests of a local file, in one pass over it (e.g. sha256 to record it, md5 to
    compare with an object store's ETag of a single-part upload)."""
    hashes = [hashlib.new(name, usedforsecurity=False) for name in algorithms]
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            for h in hashes:
                h.update(chunk)
    return tuple(h.hexdigest() for h in hashes)


def read_bytes(fs: fsspec.AbstractFileSystem, path: str) -> bytes:
    return with_retries(lambda: fs.cat_file(path), f"read {path}")


def read_parquet_metadata(fs: fsspec.AbstractFileSystem | None, path: str) -> Any:
    """A Parquet file's footer (``pyarrow.parquet.FileMetaData``), fetched alone.

    pyarrow reads the file's last 64 KiB (and more only for a larger footer). Through
    fsspec's default read-ahead cache the same call fetches the whole file, up to the
    cache's block size (50 MB on S3): a staged shard verified by its footer would be
    downloaded again whole. No retries here; callers wrap it in theirs.
    """
    import pyarrow.parquet as pq

    if fs is None:  # a local path
        return pq.read_metadata(path)
    with fs.open(path, "rb", cache_type="none") as f:
        return pq.read_metadata(f)


def read_parquet_columns(
    fs: fsspec.AbstractFileSystem, path: str, columns: list[str]
) -> Any | None:
    """Only ``columns`` of a Parquet file (a pyarrow Table), or None if one is missing.

    Opened without fsspec's read-ahead cache, so each of pyarrow's reads is one ranged
    GET of exactly its bytes: the footer, then the chosen column chunks. The default
    cache rounds reads up to its block size (50 MB for S3), so it fetches whole shard
    files, every column included: twice the bytes for the vectors of a CLIP table.
    """
    import pyarrow.parquet as pq

    def read() -> Any | None:
        with fs.open(path, "rb", cache_type="none") as f:
            parquet = pq.ParquetFile(f, pre_buffer=True)  # coalesces adjacent ranges
            if not set(columns) <= set(parquet.schema_arrow.names):
                return None
            return parquet.read(columns=columns)

    return with_retries(read, f"read {path}")


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write so that readers see the old content or the new one, never a partial file.

    Local: write a sibling temp file then rename (atomic on POSIX). Object stores:
    a single PUT is atomic already.
    """
    if _is_local_fs(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    with_retries(lambda: fs.pipe_file(path, data), f"write {path}")


def move(fs: fsspec.AbstractFileSystem, src: str, dst: str, shard: str = "") -> None:
    """Move a staged file into place: rename locally, copy then delete on stores.

    A crash between the copy and the delete leaves a staged copy behind; it is
    bookkeeping under ``_tmp/``, never read, and removed by the next run's cleanup.
    """
    if _is_local_fs(fs):
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.replace(src, dst)
        return
    # A server-side copy is atomic for readers of dst: they see all of it or nothing.
    # cp_file/rm_file, not copy/rm: those expand paths first, a listing per call.
    with_retries(lambda: fs.cp_file(src, dst), f"copy {src} -> {dst}")
    crash_point("mid_move", shard)
    remove_quietly(fs, src)


def remove_quietly(fs: fsspec.AbstractFileSystem, path: str, recursive: bool = False) -> None:
    """Remove a file (one request), or a folder with ``recursive``; failures only logged."""
    try:
        if recursive:
            with_retries(lambda: fs.rm(path, recursive=True), f"remove {path}")
        else:
            with_retries(lambda: fs.rm_file(path), f"remove {path}")
    except FileNotFoundError:
        pass
    except Exception as e:  # cleaning staging is best effort; a later run retries it
        log.warning("could not remove %s: %s", path, e)


def _is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in LOCAL_PROTOCOLS


def is_local_fs(fs: fsspec.AbstractFileSystem) -> bool:
    return _is_local_fs(fs)
