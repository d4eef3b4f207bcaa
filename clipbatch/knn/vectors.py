"""A table file's vectors for an index: the key and vector columns only, one file at a time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipbatch.errors import ConfigError
from clipbatch.io.storage import read_parquet_columns
from clipbatch.sink.schema import decode_metadata
from clipbatch.tables.snapshot import Snapshot, TableFile
from clipbatch.tables.vectors import embedding_matrix, normalize_rows


@dataclass
class FileVectors:
    file: TableFile
    rows: np.ndarray  # row numbers in the file of the rows that have a vector
    keys: list[str]
    vectors: np.ndarray  # float32 [n, d], L2-normalised
    model: dict[str, Any] = field(default_factory=dict)  # what the file's footer records


def read_vectors(snap: Snapshot, file: TableFile, column: str) -> FileVectors:
    """The vectors of one file (the key and vector columns only), rows without one
    skipped, and the model its footer records (the same read)."""
    table = read_parquet_columns(snap.fs, file.path, ["key", column])
    if table is None:
        return FileVectors(file, np.zeros(0, np.int64), [], np.zeros((0, 1), np.float32))
    model = dict((decode_metadata(table.schema.metadata) or {}).get("model") or {})
    mat, valid = embedding_matrix(table.column(column))
    rows = np.flatnonzero(valid)
    keys = pc.take(table.column("key"), pa.array(rows, type=pa.int64())).to_pylist()
    return FileVectors(file, rows, keys, normalize_rows(mat[rows]).astype(np.float32), model)


class ModelChangedError(ConfigError):
    """A file was written by another model than the index (or the other files)."""


class OneModel:
    """Every file read must record the same checkpoint; the first one sets it."""

    def __init__(self, root: str, expected: dict[str, Any] | None = None) -> None:
        self.root = root
        self.model = dict(expected) if expected else None

    def check(self, fv: FileVectors) -> None:
        if not fv.model:
            return
        if self.model is None:
            self.model = fv.model
        elif fv.model.get("checkpoint_sha256") != self.model.get("checkpoint_sha256"):
            raise ModelChangedError(
                f"{self.root}: {fv.file.key} was written by model {fv.model.get('name')} "
                f"(sha256 {str(fv.model.get('checkpoint_sha256'))[:12]}…), the others by "
                f"{self.model.get('name')} (sha256 "
                f"{str(self.model.get('checkpoint_sha256'))[:12]}…); index each model's "
                "tables under a root of their own"
            )


def iter_vectors(snap: Snapshot, files: list[TableFile], column: str) -> Iterator[FileVectors]:
    return (read_vectors(snap, file, column) for file in files)
