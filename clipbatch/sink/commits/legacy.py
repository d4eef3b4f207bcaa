"""Reading a pre-index ``_manifest.json`` as commit records (the parsing is in
:mod:`clipbatch.upgrade.manifest_v1`, with the version after which it may go)."""

from __future__ import annotations

from collections.abc import Iterator

from clipbatch.config import SinkConfig
from clipbatch.io.storage import get_fs, join, read_bytes
from clipbatch.sink.commits.segments import CommitRecord
from clipbatch.upgrade.manifest_v1 import LEGACY_MANIFEST, shard_entries


def legacy_manifest_uri(dest: str) -> str:
    return join(dest, LEGACY_MANIFEST)


def read_legacy_manifest(sink: SinkConfig) -> dict[str, dict] | None:
    """The shard entries of a pre-index ``_manifest.json``, or None when there is none."""
    fs, path = get_fs(legacy_manifest_uri(sink.url), sink.storage)
    try:
        raw = read_bytes(fs, path)
    except FileNotFoundError:
        return None
    return shard_entries(raw, path)


def legacy_records(entries: dict[str, dict]) -> Iterator[CommitRecord]:
    """The entries as records; they carry no file version (the index binds one later)."""
    for shard, fields in entries.items():
        yield CommitRecord(shard=shard, file_version=None, **fields)
