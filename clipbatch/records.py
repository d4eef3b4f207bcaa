"""Typed records passed between the pipeline stages.

reader -> :class:`RawSample` -> decode/preprocess -> :class:`PreparedSample`
-> encode -> :class:`RowBlock` -> sink. Row statuses are stable codes
(docs/design.md §3): once a row has a non-ok status it still flows to the sink, without the
embeddings its status rules out (stored as all-zero vectors: every Parquet reader reads
them, where null fixed-size lists fail older ones), so every input row yields exactly one
output row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Stable per-row status codes. Add new ones at the end; never rename.
OK = "ok"
DECODE_ERROR = "decode_error"
MISSING_IMAGE = "missing_image"
MISSING_CAPTION = "missing_caption"
EMPTY_CAPTION = "empty_caption"
CAPTION_DECODE_ERROR = "caption_decode_error"
TOO_LARGE = "too_large"
FETCH_ERROR = "fetch_error"
DUPLICATE_KEY = "duplicate_key"
UNSAFE_PATH = "unsafe_path"
SHARD_DAMAGED = "shard_damaged"
ENCODE_ERROR = "encode_error"
NOT_FOUND = "not_found"  # a referenced object or URL does not exist (missing key, HTTP 404/410)
BAD_ROW = "bad_row"  # a table row that cannot be parsed (malformed JSONL line, ragged CSV row)
BLOCKED_URL = "blocked_url"  # an image URL that resolves to a network the fetcher may not reach
# A fetch that failed for a transient reason (timeout, reset, 5xx, throttling) after its
# retries: a later run can fetch it again (`--retry-failed`). ``fetch_error`` is permanent
# (401/403, DNS, a bad reference); in tables written before this status, it counts as
# transient (within the attempt bound).
FETCH_TRANSIENT = "fetch_transient"
RETRYABLE_STATUSES = frozenset({FETCH_TRANSIENT})

# A row with a caption problem still carries its image embedding, and a row with an
# image problem still carries its text embedding: the status says what is missing.
# The pipeline, the writer and `clipbatch inspect` all take the rule from here.
IMAGE_KEEPING_STATUSES = frozenset({OK, MISSING_CAPTION, EMPTY_CAPTION, CAPTION_DECODE_ERROR})
CAPTION_KEEPING_STATUSES = frozenset(
    {MISSING_IMAGE, DECODE_ERROR, TOO_LARGE, FETCH_ERROR, FETCH_TRANSIENT, NOT_FOUND, BLOCKED_URL}
)


def may_keep_image(status: str) -> bool:
    """Whether a row with ``status`` may carry an image embedding."""
    return status in IMAGE_KEEPING_STATUSES


def may_keep_caption(status: str) -> bool:
    """Whether a row with ``status`` may carry a text embedding."""
    return status == OK or status in CAPTION_KEEPING_STATUSES


# column -> the rule for whether a row's status allows a vector there
VECTOR_KEEP_RULES = {"image_embedding": may_keep_image, "text_embedding": may_keep_caption}


# The embedding table's own columns, in order (docs/design.md §3). ``sink/schema.py`` gives
# them their types; a test holds the two together.
TABLE_COLUMNS = (
    "key",
    "source_uri",
    "source_member",
    "source_version",
    "caption",
    "caption_truncated",
    "image_sha256",
    "width",
    "height",
    "status",
    "error",
    "image_embedding",
    "text_embedding",
    "similarity",
)
# Our columns, plus the ``json`` passthrough readers add: a source column of one of these
# names is passed through as ``source_{name}``, so neither is lost.
RESERVED_NAMES = frozenset(TABLE_COLUMNS) | {"json"}


def passthrough_name(column: str) -> str:
    """The output name of a source column passed through (sidecar, table column)."""
    return f"source_{column}" if column in RESERVED_NAMES else column


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One unit of work, retry and commit (docs/design.md §1).

    Slotted: a plan over 230,000 shards holds one of these per shard.
    """

    uri: str  # the shard object's URI (for folder shards, the folder URI)
    name: str  # output stem: {dest}/{name}.parquet
    kind: str  # webdataset | folder | table
    version: str  # ETag / version id / size+mtime; for folder slices a hash of members
    members: tuple[str, ...] = ()  # folder slices: the member URIs in this shard
    sidecar_uri: str | None = None  # webdataset: sibling img2dataset .parquet
    row_range: tuple[int, int] | None = None  # table: [start, stop) rows, None = all
    base_uri: str | None = None  # table: where relative image paths resolve
    sidecar_version: str | None = None  # the sidecar's version, from the same listing


@dataclass
class RawSample:
    """One input row as read, before any decoding."""

    key: str
    source_member: str
    image_bytes: bytes | None = None
    caption: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    status: str = OK
    error: str | None = None
    image_uri: str | None = None  # table rows whose image must still be fetched
    # Where the image is in its source, for showing a row later (``_members/``): a tar
    # member's name with its data offset and size, or the reference a table row holds.
    image_member: str | None = None
    image_offset: int | None = None
    image_size: int | None = None
    has_caption_field: bool = True  # False in image-only datasets: no caption expected
    has_image_field: bool = True  # False in caption-only datasets: no image expected

    def keeps_image(self) -> bool:
        """Whether this row still gets an image embedding despite its status."""
        return may_keep_image(self.status)

    def keeps_caption(self) -> bool:
        """Whether this row still gets a text embedding despite its status."""
        return may_keep_caption(self.status)


@dataclass
class PreparedSample:
    """A row after decode and per-image preprocessing (uint8 HxWx3, model resolution)."""

    raw: RawSample
    pixels: np.ndarray | None = None
    width: int | None = None
    height: int | None = None
    image_sha256: bytes | None = None
    # preprocess="gpu": JPEG bytes left for the batched decoder on the model's device.
    deferred_jpeg: bytes | None = None


@dataclass
class RowBlock:
    """Rows ready to write, with embeddings already normalised and cast."""

    rows: list[PreparedSample]
    image_embeddings: np.ndarray | None  # (n, D), NaN rows where absent (zeros once written)
    text_embeddings: np.ndarray | None
    has_image: np.ndarray  # bool mask
    has_text: np.ndarray
    truncated: list[bool]


@dataclass
class StageTimings:
    """Seconds spent per stage, summed over workers (clip-retrieval style)."""

    read: float = 0.0
    decode: float = 0.0
    encode: float = 0.0
    write: float = 0.0

    def add(self, other: StageTimings) -> None:
        self.read += other.read
        self.decode += other.decode
        self.encode += other.encode
        self.write += other.write

    def as_dict(self) -> dict[str, float]:
        return {
            "read": round(self.read, 4),
            "decode": round(self.decode, 4),
            "encode": round(self.encode, 4),
            "write": round(self.write, 4),
        }


@dataclass
class ShardResult:
    """What one shard produced; the task's return value and the summary's row."""

    shard: str
    output_uri: str
    status: str  # committed | skipped | failed
    rows: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    timings: StageTimings = field(default_factory=StageTimings)
    fingerprint: str = ""
    source_uri: str = ""
    source_version: str = ""
    sha256: str | None = None  # checksum of the committed file
    error: str | None = None
    file_version: str | None = (
        None  # the committed file's ETag / size+mtime (the index binds to it)
    )
    retried: dict[str, int] | None = None  # a retry of failed rows: {rows, recovered}

    @property
    def ok_rows(self) -> int:
        return self.counts.get(OK, 0)

    @property
    def failed_rows(self) -> int:
        return self.rows - self.ok_rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "output_uri": self.output_uri,
            "status": self.status,
            "rows": self.rows,
            "counts": dict(self.counts),
            "seconds": round(self.seconds, 4),
            "timings": self.timings.as_dict(),
            "fingerprint": self.fingerprint,
            "source_uri": self.source_uri,
            "source_version": self.source_version,
            "sha256": self.sha256,
            "error": self.error,
            "file_version": self.file_version,
            **({"retried": dict(self.retried)} if self.retried else {}),
        }
