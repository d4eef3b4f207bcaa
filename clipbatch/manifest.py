"""``{dest}/_manifest.json``: the dataset index, updated last and atomically.

It maps each committed shard to its fingerprint, counts and checksum. Shard files
are the truth: the manifest is an index over them, so a crash between moving a
file and updating the manifest is repaired by the next run, which reads the file's
own footer (see :func:`clipbatch.plan.plan_shards`).

Concurrent writers (two runs, or several shards of one run in several processes)
merge instead of overwriting each other: every update is a read-modify-write that
only lands if nobody wrote in between, and is redone on the fresh copy otherwise.

- S3: a conditional PUT, ``If-Match: <etag read>`` (``If-None-Match: *`` when the
  manifest does not exist yet). S3 and moto answer 412 when someone else won.
- Local disk: an exclusive ``flock`` on ``_manifest.json.lock`` around the update,
  and an atomic rename for the write itself.
- Other stores: write then read back and check our entries are there; a lost update
  can only drop an index entry, which the next run re-adopts from the file's footer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import fsspec

from clipbatch.config import SinkConfig
from clipbatch.errors import TransientIOError
from clipbatch.storage import (
    get_fs,
    is_local_fs,
    join,
    protocol_of,
    read_bytes,
    with_retries,
    write_bytes_atomic,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 1
MAX_CONFLICTS = 50  # conditional-write races lost in a row before giving up


def manifest_uri(dest: str) -> str:
    return join(dest, MANIFEST_NAME)


def _empty() -> dict[str, Any]:
    return {"version": MANIFEST_VERSION, "shards": {}}


def _parse(raw: bytes, path: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as e:
        # Written atomically, so this means someone edited it by hand; shard footers
        # still hold the truth and the next update rewrites it.
        log.warning("ignoring unreadable %s: %s", path, e)
        return _empty()
    if not isinstance(data, dict):
        return _empty()
    data.setdefault("shards", {})
    return data


def read_manifest(sink: SinkConfig) -> dict[str, Any]:
    fs, path = get_fs(manifest_uri(sink.url), sink.storage)
    try:
        return _parse(read_bytes(fs, path), path)
    except FileNotFoundError:
        return _empty()


def _merge(data: dict[str, Any], entries: dict[str, dict[str, Any]]) -> bytes:
    data["shards"].update(entries)
    data["version"] = MANIFEST_VERSION
    data["updated_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return json.dumps(data, indent=1, sort_keys=True).encode()


def update_manifest(sink: SinkConfig, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Merge ``entries`` (shard name -> record) into the manifest, safe across processes."""
    fs, path = get_fs(manifest_uri(sink.url), sink.storage)
    if is_local_fs(fs):
        with _local_lock(path):
            data = read_manifest(sink)
            write_bytes_atomic(fs, path, _merge(data, entries))
            return data
    if protocol_of(sink.url) in ("s3", "s3a"):
        return _update_conditional(fs, path, entries)
    return _update_verified(sink, fs, path, entries)


@contextlib.contextmanager
def _local_lock(path: str) -> Iterator[None]:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    # The lock file is never removed: removing it would let two processes lock two
    # different inodes. It starts with "_", so table readers skip it.
    with open(f"{path}.lock", "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _is_precondition_failure(exc: BaseException | None) -> bool:
    while exc is not None:
        if isinstance(exc, FileExistsError):  # s3fs's translation of If-None-Match: 412
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response.get("Error", {}).get("Code")
            if status == 412 or code == "PreconditionFailed":
                return True
        exc = exc.__cause__ or exc.__context__
    return False


def _update_conditional(
    fs: fsspec.AbstractFileSystem, path: str, entries: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    for attempt in range(1, MAX_CONFLICTS + 1):
        # The ETag is taken before the body: if the object changes in between, the
        # If-Match below fails and we start over, so we never write over an update
        # we did not read.
        try:
            etag = with_retries(lambda: fs.info(path), f"stat {path}")["ETag"]
            data = _parse(read_bytes(fs, path), path)
            condition: dict[str, str] = {"IfMatch": etag}
        except FileNotFoundError:
            data, condition = _empty(), {"IfNoneMatch": "*"}
        body = _merge(data, entries)
        try:
            with_retries(lambda b=body, c=condition: fs.pipe_file(path, b, **c), f"write {path}")
            return data
        except Exception as e:
            if not _is_precondition_failure(e):
                raise
            delay = random.uniform(0, min(1.0, 0.01 * 2**attempt))
            log.info("manifest changed under us (attempt %d); merging again", attempt)
            time.sleep(delay)
    raise TransientIOError(f"{path}: lost {MAX_CONFLICTS} manifest update races in a row")


def _update_verified(
    sink: SinkConfig, fs: fsspec.AbstractFileSystem, path: str, entries: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    for attempt in range(1, MAX_CONFLICTS + 1):
        data = read_manifest(sink)
        write_bytes_atomic(fs, path, _merge(data, entries))
        back = read_manifest(sink)["shards"]
        if all(back.get(k) == v for k, v in entries.items()):
            return data
        time.sleep(random.uniform(0, min(1.0, 0.01 * 2**attempt)))
    raise TransientIOError(f"{path}: our manifest entries kept being overwritten")
