"""The embedding table's schema and file metadata (docs/design.md §3)."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from clipbatch.records import TABLE_COLUMNS

SCHEMA_VERSION = 1
METADATA_KEY = b"clipbatch"

BASE_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("source_uri", pa.string()),
    pa.field("source_member", pa.string()),
    pa.field("source_version", pa.string()),
    pa.field("caption", pa.string()),
    pa.field("caption_truncated", pa.bool_()),
    pa.field("image_sha256", pa.binary(32)),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
]
BASE_NAMES = set(TABLE_COLUMNS)


def embedding_type(dim: int, dtype: str) -> pa.DataType:
    value = pa.float16() if dtype == "float16" else pa.float32()
    return pa.list_(value, dim)


def build_schema(dim: int, dtype: str, passthrough: list[pa.Field]) -> pa.Schema:
    fields = [
        *BASE_FIELDS,
        pa.field("image_embedding", embedding_type(dim, dtype)),
        pa.field("text_embedding", embedding_type(dim, dtype)),
        pa.field("similarity", pa.float32()),
    ]
    fields += [f for f in passthrough if f.name not in BASE_NAMES]
    return pa.schema(fields)


def encode_metadata(meta: dict[str, Any]) -> dict[bytes, bytes]:
    return {METADATA_KEY: json.dumps(meta, sort_keys=True).encode()}


def decode_metadata(schema_metadata: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    if not schema_metadata or METADATA_KEY not in schema_metadata:
        return None
    try:
        return json.loads(schema_metadata[METADATA_KEY])
    except ValueError:
        return None
