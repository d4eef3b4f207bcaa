"""A table exported in clip-retrieval's inference layout, for autofaiss and ``clip back``.

The layout is the one ``clip-retrieval inference`` writes, which autofaiss,
embedding-reader and ``clip back`` read as they are::

    OUT/img_emb/img_emb_{i}.npy          float16 [n, D], L2-normalised
    OUT/text_emb/text_emb_{i}.npy        float16 [n, D], L2-normalised
    OUT/metadata/metadata_{i}.parquet    image_path (the row's key), caption, key, source_uri

The three files of partition ``i`` hold the same rows in the same order; ``i`` is
zero-padded to one width for every partition, since readers join them by sorted name.
Only rows with both vectors are exported (one metadata table serves both indexes);
the others are counted by reason. Tables of any release are read (null vectors or zero
vectors, :func:`clipbatch.tables.vectors.embedding_matrix`), one shard file at a time,
only the columns needed: memory stays bounded by the largest shard file.
"""

from __future__ import annotations

import io
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import StorageOptions
from clipbatch.errors import ClipbatchError
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs, join, write_bytes_atomic
from clipbatch.records import OK
from clipbatch.tables.table import OutputTable, open_tables
from clipbatch.tables.vectors import embedding_matrix, normalize_rows

log = logging.getLogger(__name__)

FORMATS = ("clip-retrieval",)
# Each vector column's folder, also its files' prefix: img_emb/img_emb_{i}.npy.
VECTOR_FOLDERS = {"image_embedding": "img_emb", "text_embedding": "text_emb"}
METADATA_FOLDER = "metadata"
READ_COLUMNS = ["key", "source_uri", "caption", "status", *VECTOR_FOLDERS]
# The most rows in one partition: a shard file with more is split (about 100 MB of
# float16 vectors per file at D=512).
MAX_ROWS_PER_PARTITION = 100_000


class ExportError(ClipbatchError):
    """The export cannot be written where it was asked to go."""


@dataclass
class ExportReport:
    """What :func:`export_clip_retrieval` wrote: rows, partitions, rows left out by reason."""

    out: str
    tables: int = 0
    files: int = 0
    rows: int = 0
    partitions: int = 0
    dim: int | None = None
    skipped: Counter = field(default_factory=Counter)
    model: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: ``exported 10 rows in 1 partition(s) from 1 file(s) to OUT
        (clip-retrieval layout); skipped 2 rows (1 decode_error, 1 missing_image)``."""
        why = ", ".join(f"{n:,} {reason}" for reason, n in sorted(self.skipped.items()))
        skipped = sum(self.skipped.values())
        return (
            f"exported {self.rows:,} rows in {self.partitions} partition(s) from "
            f"{self.files} file(s) to {self.out} (clip-retrieval layout); "
            f"skipped {skipped:,} rows{f' ({why})' if why else ''}"
        )


def export_clip_retrieval(
    root: str,
    out: str,
    storage: StorageOptions | None = None,
    out_storage: StorageOptions | None = None,
    max_rows_per_partition: int = MAX_ROWS_PER_PARTITION,
    overwrite: bool = False,
) -> ExportReport:
    """Write the rows of the table (or partition root) ``root`` that have both vectors
    to ``out`` in clip-retrieval's layout; one partition per shard file (split above
    ``max_rows_per_partition`` rows). ``out`` must not hold an export already unless
    ``overwrite``, and may lie under ``root`` only in a ``_``-prefixed folder.

    Example::

        report = export_clip_retrieval("s3://bucket/embeddings/", "/data/clip-export")
        print(report.summary())
        # autofaiss build_index --embeddings=/data/clip-export/img_emb \\
        #     --index_path=knn.index --index_infos_path=infos.json
    """
    if max_rows_per_partition < 1:
        raise ExportError(
            f"max_rows_per_partition must be at least 1, got {max_rows_per_partition}"
        )
    out_storage = out_storage or storage
    tables = open_tables(root, storage)
    fs, base = get_fs(out, out_storage)
    base = base.rstrip("/")
    _check_not_inside(root, storage, out, out_storage)
    report = ExportReport(out=out, tables=len(tables), model=_one_model(root, tables))
    _prepare(fs, base, out, overwrite)
    bound = sum(math.ceil(f.rows / max_rows_per_partition) for t in tables for f in t.files)
    width = len(str(max(bound, 1)))
    for table in tables:
        for file in table.files:
            report.files += 1
            data = table.read(file, READ_COLUMNS)
            vectors = {c: embedding_matrix(data.column(c)) for c in VECTOR_FOLDERS}
            keep = _exportable(data, vectors, report.skipped)
            report.dim = report.dim or data.schema.field("image_embedding").type.list_size
            for start in range(0, len(keep), max_rows_per_partition):
                rows = keep[start : start + max_rows_per_partition]
                name = f"{report.partitions:0{width}d}"
                _write_partition(
                    fs, base, name, data, {c: m for c, (m, _) in vectors.items()}, rows
                )
                log.info("%s: partition %s, %d rows from %s", out, name, len(rows), file.path)
                report.partitions += 1
                report.rows += len(rows)
            del data, vectors
    log.info("%s", report.summary())
    return report


def _exportable(
    data: pa.Table, vectors: dict[str, tuple[np.ndarray, np.ndarray]], skipped: Counter
) -> np.ndarray:
    """Row numbers with status ok and both vectors; the others counted in ``skipped``
    by status (or, for an ok row without one, by the vector it lacks)."""
    has_image, has_text = vectors["image_embedding"][1], vectors["text_embedding"][1]
    status = np.asarray(data.column("status").to_pylist(), dtype=object)
    ok = status == OK
    keep = ok & has_image & has_text
    for i in np.flatnonzero(~keep):
        if not ok[i]:
            skipped[str(status[i])] += 1
        else:  # an ok row of an image-only or caption-only dataset
            skipped["ok, no text vector" if has_image[i] else "ok, no image vector"] += 1
    return np.flatnonzero(keep)


def _write_partition(
    fs: Any, base: str, name: str, data: pa.Table, mats: dict[str, np.ndarray], rows: np.ndarray
) -> None:
    """The three files of partition ``name``: ``rows`` of ``data``, in order."""
    for column, folder in VECTOR_FOLDERS.items():
        buf = io.BytesIO()
        np.save(buf, normalize_rows(mats[column][rows]).astype(np.float16))
        write_bytes_atomic(fs, f"{base}/{folder}/{folder}_{name}.npy", buf.getvalue())
    part = data.select(["key", "caption", "source_uri"]).take(pa.array(rows, type=pa.int64()))
    keys = part.column("key").cast(pa.string())
    meta = pa.table(
        {
            "image_path": keys,
            "caption": part.column("caption").cast(pa.string()),
            "key": keys,
            "source_uri": part.column("source_uri").cast(pa.string()),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(meta, sink)
    path = f"{base}/{METADATA_FOLDER}/{METADATA_FOLDER}_{name}.parquet"
    write_bytes_atomic(fs, path, sink.getvalue().to_pybytes())


def _prepare(fs: Any, base: str, out: str, overwrite: bool) -> None:
    """Refuse an ``out`` that holds an export already, or clear it with ``overwrite``."""
    for folder in (*VECTOR_FOLDERS.values(), METADATA_FOLDER):
        path = f"{base}/{folder}"
        try:
            present = with_retries(lambda p=path: fs.ls(p, detail=False), f"list {path}")
        except FileNotFoundError:
            continue
        if not present:
            continue
        if not overwrite:
            raise ExportError(
                f"{join(out, folder)} is not empty: export to a new folder, or overwrite it "
                "(--overwrite)"
            )
        with_retries(lambda p=path: fs.rm(p, recursive=True), f"remove {path}")
        fs.invalidate_cache(path)


def _check_not_inside(
    root: str, storage: StorageOptions | None, out: str, out_storage: StorageOptions | None
) -> None:
    """An export under ``root`` would be read back as a table, unless its folder is
    bookkeeping (a name starting with ``_``)."""
    from clipbatch.sources.listing import is_bookkeeping

    root_fs, root_path = get_fs(root, storage)
    out_fs, out_path = get_fs(out, out_storage)
    if type(root_fs) is not type(out_fs):
        return
    root_path, out_path = root_path.rstrip("/"), out_path.rstrip("/")
    if out_path == root_path or (
        out_path.startswith(root_path + "/") and not is_bookkeeping(out_path[len(root_path) + 1 :])
    ):
        raise ExportError(
            f"{out} is inside the table root {root}: its metadata files would be read as a "
            "table; export elsewhere, or under a folder whose name starts with '_'"
        )


def _one_model(root: str, tables: list[OutputTable]) -> dict[str, Any]:
    """The model every shard file records; vectors of two models do not share an index."""
    models = {
        str(m["model"].get("checkpoint_sha256")): m["model"]
        for t in tables
        for m in (f.metadata for f in t.files)
        if m and m.get("model")
    }
    if len(models) > 1:
        names = sorted(f"{m.get('name')} ({sha[:12]}…)" for sha, m in models.items())
        raise ExportError(
            f"{root}: shard files were written by different models ({', '.join(names)}); "
            "their vectors do not belong in one index: export each model's tables apart"
        )
    return next(iter(models.values()), {})
