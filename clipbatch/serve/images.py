"""Rows' source images and their thumbnails, resized on the server and cached.

The image is content-addressed (its sha256 is in the row), so responses carry that as
their ETag and may be cached for good by a browser; thumbnails are kept in a bounded
in-memory LRU as well.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image, ImageOps

from clipbatch.tables.row_images import RowImageError, RowImages, RowLocation

THUMBNAIL_SIZES = (64, 128, 256, 512)


class NotAnImageError(RowImageError):
    """The row's source bytes are not an image a thumbnail can be made of (the row's
    status, e.g. decode_error, says so too); the original bytes are still served."""


class ImageService:
    def __init__(self, images: RowImages, cache_bytes: int = 64 << 20) -> None:
        self.images = images
        self.cache_bytes = cache_bytes
        self._thumbs: OrderedDict[tuple[bytes, int], bytes] = OrderedDict()
        self._held = 0
        self._lock = threading.Lock()

    def original(self, row: RowLocation) -> tuple[bytes, str]:
        """The source bytes, checked against the row's hash, and their media type."""
        data = self.images.read(row)
        return data, media_type(data)

    def thumbnail(self, row: RowLocation, size: int) -> bytes:
        """A JPEG no larger than ``size`` on its longer side (one of THUMBNAIL_SIZES)."""
        key = (row.image_sha256 or b"", size)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        data, _ = self.original(row)
        try:
            thumb = make_thumbnail(data, size)
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL's decode errors
            raise NotAnImageError(f"row {row.key!r}: no thumbnail: {e}") from e
        with self._lock:
            self._thumbs[key] = thumb
            self._held += len(thumb)
            while self._held > self.cache_bytes and self._thumbs:
                _, old = self._thumbs.popitem(last=False)
                self._held -= len(old)
        return thumb


def make_thumbnail(data: bytes, size: int) -> bytes:
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when it can
        img = ImageOps.exif_transpose(img) or img
        img = img.convert("RGB")
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        img.save(out, "JPEG", quality=85)
    return out.getvalue()


def media_type(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    return "application/octet-stream"
