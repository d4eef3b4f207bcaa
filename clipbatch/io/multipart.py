"""Uploads that become visible only when told to: S3 multipart uploads, completed later.

An S3 object written by a multipart upload does not exist until the upload is completed,
and completing it is atomic for readers (they see the whole object or none) and moves no
bytes. So a file can be uploaded *to its final key* well before it may be seen, and made
visible later by one small request: the store keeps the parts, not a staged copy that a
server-side copy would then read and write again.

- :func:`upload_deferred` uploads a local file as the parts of an upload it does not
  complete, and returns what completing it needs (:class:`DeferredUpload`, plain JSON
  for a commit record);
- :func:`complete` makes it visible; idempotent: an upload completed already (by a run
  that crashed before it could record so) is found as the object it became;
- :func:`abort` throws one away; :func:`pending` lists those left under a prefix (one
  request per 1,000).

Only for S3 (and stores that speak its API through s3fs): :func:`supported`. Other
stores stage a copy and move it (:func:`clipbatch.io.storage.move`).

Example::

    fs, path = get_fs("s3://bucket/curated/00003.tar")
    upload = upload_deferred(fs, path, Path("/tmp/00003.tar"))
    ...  # commit a record that holds upload.as_dict()
    complete(fs, path, upload)
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec

from clipbatch.io.retry import with_retries

log = logging.getLogger(__name__)

PART_SIZE = 32 << 20  # bytes per part (S3: at least 5 MiB, but for the last)
MAX_PARTS = 10_000  # S3's limit: a larger file gets larger parts
PART_THREADS = 4  # parts of one file uploading at once


@dataclass(frozen=True)
class DeferredUpload:
    """An upload whose parts are in the store, not yet an object."""

    upload_id: str
    parts: tuple[tuple[int, str], ...]  # (part number, ETag)

    def as_dict(self) -> dict[str, Any]:
        return {"upload_id": self.upload_id, "parts": [list(p) for p in self.parts]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeferredUpload:
        return cls(str(data["upload_id"]), tuple((int(n), str(e)) for n, e in data["parts"]))


def supported(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is s3fs (multipart uploads, through its ``call_s3``)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return bool({"s3", "s3a"} & set(protocols)) and hasattr(fs, "call_s3")


def _where(fs: Any, path: str) -> dict[str, str]:
    bucket, key, _ = fs.split_path(path)
    return {"Bucket": bucket, "Key": key}


def part_size(size: int) -> int:
    """:data:`PART_SIZE`, or larger where the file would need more than :data:`MAX_PARTS`."""
    return max(PART_SIZE, -(-size // MAX_PARTS))


def upload_deferred(fs: Any, path: str, local: Path) -> DeferredUpload:
    """Upload ``local`` as the parts of a multipart upload to ``path``, not completed:
    nothing is visible at ``path`` until :func:`complete`. On an error, the upload is
    aborted (its parts freed) and the error raised."""
    where = _where(fs, path)
    started = with_retries(
        lambda: fs.call_s3("create_multipart_upload", **where), f"start an upload to {path}"
    )
    upload_id = started["UploadId"]
    size = local.stat().st_size
    step = part_size(size)
    offsets = list(range(0, size, step)) or [0]

    def part(number: int) -> tuple[int, str]:
        with local.open("rb") as f:
            f.seek(offsets[number - 1])
            body = f.read(step)
        done = with_retries(
            lambda: fs.call_s3(
                "upload_part", **where, UploadId=upload_id, PartNumber=number, Body=body
            ),
            f"upload part {number} of {path}",
        )
        return number, str(done["ETag"])

    try:
        if len(offsets) == 1:
            parts = [part(1)]
        else:
            threads = min(PART_THREADS, len(offsets))
            with ThreadPoolExecutor(threads, thread_name_prefix="upload-part") as pool:
                parts = list(pool.map(part, range(1, len(offsets) + 1)))
    except BaseException:
        abort(fs, path, upload_id)
        raise
    return DeferredUpload(upload_id, tuple(parts))


def complete(fs: Any, path: str, upload: DeferredUpload) -> None:
    """Make ``upload`` the object at ``path`` (atomic for readers). Completed already: a
    no-op. Gone and never completed (aborted, or expired by a lifecycle rule): an
    error that says so."""
    where = _where(fs, path)
    parts = [{"PartNumber": n, "ETag": e} for n, e in upload.parts]
    try:
        with_retries(
            lambda: fs.call_s3(
                "complete_multipart_upload", **where, UploadId=upload.upload_id,
                MultipartUpload={"Parts": parts},
            ),
            f"complete the upload to {path}",
        )  # fmt: skip
    except FileNotFoundError:  # NoSuchUpload: completed before (a crashed run), or gone
        if not with_retries(lambda: fs.exists(path), f"stat {path}"):
            raise FileNotFoundError(
                f"{path}: its upload {upload.upload_id} is gone and was never completed "
                "(aborted, or expired by the bucket's lifecycle rules)"
            ) from None


def abort(fs: Any, path: str, upload_id: str) -> None:
    """Free an upload's parts; one gone already is fine, other failures only logged."""
    try:
        with_retries(
            lambda: fs.call_s3("abort_multipart_upload", **_where(fs, path), UploadId=upload_id),
            f"abort the upload to {path}",
        )
    except FileNotFoundError:
        pass
    except Exception as e:  # best effort; a later run, or a lifecycle rule, frees it
        log.warning("could not abort the upload %s to %s: %s", upload_id, path, e)


def pending(fs: Any, prefix: str) -> list[tuple[str, str]]:
    """The uploads not completed under ``prefix`` (a folder path): (path, upload id)."""
    bucket, key, _ = fs.split_path(prefix.rstrip("/") + "/")
    out: list[tuple[str, str]] = []
    markers: dict[str, str] = {}
    while True:
        where = {"Bucket": bucket, "Prefix": key, **markers}
        page = with_retries(
            lambda where=where: fs.call_s3("list_multipart_uploads", **where),
            f"list the uploads under {prefix}",
        )
        out += [(f"{bucket}/{u['Key']}", u["UploadId"]) for u in page.get("Uploads", [])]
        if not page.get("IsTruncated"):
            return out
        markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}
