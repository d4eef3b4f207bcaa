"""Every row of a root, without its vectors, held once: what a query's hits are shown with.

Read at start-up, one file at a time, only the columns a page shows (key, caption,
status, error, similarity, source, image hash, size), so a hit's key and caption never
cost a read per query. About 100 bytes a row: a million rows hold about 100 MB.
Brute-force search also keeps the image vectors (``with_vectors``), as float16.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipbatch.config import StorageOptions
from clipbatch.errors import ClipbatchError
from clipbatch.records import OK
from clipbatch.tables.row_images import RowLocation
from clipbatch.tables.table import OutputTable, ShardFile, open_tables
from clipbatch.tables.vectors import embedding_matrix

log = logging.getLogger(__name__)

COLUMNS = (
    "key",
    "caption",
    "status",
    "error",
    "similarity",
    "source_uri",
    "source_member",
    "source_version",
    "image_sha256",
    "width",
    "height",
)


class RowNotFound(ClipbatchError):
    """No row has that key (in that partition)."""


@dataclass(frozen=True)
class FileInfo:
    table: str  # the partition table, relative to the root ("" for the root itself)
    dest: str
    name: str  # e.g. 00000.parquet
    start: int  # its first row in the catalog
    rows: int
    metadata: dict[str, Any]

    @property
    def shard(self) -> str:
        return self.name[: -len(".parquet")]


@dataclass
class RowCatalog:
    """Rows of every table under a root, in table, file and row order."""

    root: str
    tables: list[str]
    files: list[FileInfo]
    rows: pa.Table  # COLUMNS
    file_of: np.ndarray  # catalog row -> index into files
    table_of: np.ndarray  # catalog row -> index into tables
    by_key: dict[tuple[str, str], int]  # (table, key) -> catalog row
    model: dict[str, Any]
    vectors: np.ndarray | None = None  # float16 [rows, D], zero where a row has none
    has_vector: np.ndarray | None = None
    status: np.ndarray = field(default_factory=lambda: np.zeros(0, object))
    similarity: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))

    def __len__(self) -> int:
        return self.rows.num_rows

    def find(self, key: str, table: str | None = None) -> int:
        """The catalog row of ``key``; ``table`` names the partition when the root has
        several (keys are unique per table, not across nights)."""
        if table is None:
            if len(self.tables) > 1:
                matches = [i for t in self.tables if (i := self.by_key.get((t, key))) is not None]
                if len(matches) == 1:
                    return matches[0]
                if matches:
                    raise RowNotFound(f"key {key!r} is in {len(matches)} partitions: name one")
                raise RowNotFound(f"no row has key {key!r}")
            table = self.tables[0]
        found = self.by_key.get((table, key))
        if found is None:
            raise RowNotFound(f"no row has key {key!r}" + (f" in {table!r}" if table else ""))
        return found

    def file(self, i: int) -> FileInfo:
        return self.files[int(self.file_of[i])]

    def row(self, i: int) -> dict[str, Any]:
        """Everything the table says about row ``i``, with where it came from."""
        values = {name: self.rows.column(name)[i].as_py() for name in COLUMNS}
        sha = values.pop("image_sha256")
        info = self.file(i)
        meta = info.metadata
        run = meta.get("run") or {}
        return {
            **values,
            "image_sha256": sha.hex() if sha else None,
            "table": info.table,
            "file": info.name,
            "row": int(i - info.start),
            "model": (meta.get("model") or {}).get("name"),
            "checkpoint_sha256": (meta.get("model") or {}).get("checkpoint_sha256"),
            "run": {
                "run_id": run.get("run_id"),
                "flow_run_id": run.get("flow_run_id"),
                "flow_run_name": run.get("flow_run_name"),
                "deployment": run.get("deployment_name"),
                "written_at": meta.get("written_at"),
            },
            "source_kind": (meta.get("source") or {}).get("kind"),
        }

    def location(self, i: int) -> RowLocation:
        """Where row ``i``'s image is, for :class:`~clipbatch.tables.row_images.RowImages`."""
        info = self.file(i)
        source = info.metadata.get("source") or {}
        options = (info.metadata.get("options") or {}).get("source_options") or {}
        return RowLocation(
            key=self.rows.column("key")[i].as_py(),
            kind=str(source.get("kind") or ""),
            dest=info.dest,
            shard=info.shard,
            source_uri=self.rows.column("source_uri")[i].as_py(),
            source_member=self.rows.column("source_member")[i].as_py(),
            image_sha256=self.rows.column("image_sha256")[i].as_py(),
            source_options=options,
        )

    def mask(
        self,
        statuses: list[str] | None = None,
        tables: list[str] | None = None,
        min_similarity: float | None = None,
        max_similarity: float | None = None,
    ) -> np.ndarray | None:
        """Rows that pass the filters (None: no filter)."""
        if not (statuses or tables or min_similarity is not None or max_similarity is not None):
            return None
        keep = np.ones(len(self), bool)
        if statuses:
            keep &= np.isin(self.status, statuses)
        if tables:
            unknown = sorted(set(tables) - set(self.tables))
            if unknown:
                raise RowNotFound(f"no partition {unknown[0]!r} under this root")
            wanted = [self.tables.index(t) for t in tables]
            keep &= np.isin(self.table_of, wanted)
        with np.errstate(invalid="ignore"):
            if min_similarity is not None:
                keep &= self.similarity >= min_similarity
            if max_similarity is not None:
                keep &= self.similarity <= max_similarity
        return keep

    # -- the overview ---------------------------------------------------------------------
    def overview(self, failed_limit: int = 100, bins: int = 40) -> dict[str, Any]:
        counts = Counter(self.status.tolist())
        by_table: dict[str, dict[str, int]] = {}
        for t, name in enumerate(self.tables):
            sub = self.status[self.table_of == t]
            by_table[name] = dict(Counter(sub.tolist()))
        sims = self.similarity[~np.isnan(self.similarity)]
        histogram: dict[str, Any] = {"edges": [], "counts": []}
        if len(sims):
            lo, hi = float(sims.min()), float(sims.max())
            if hi - lo < 1e-6:
                hi = lo + 1e-3
            hist, edges = np.histogram(sims, bins=bins, range=(lo, hi))
            histogram = {"edges": [round(float(e), 4) for e in edges], "counts": hist.tolist()}
        failed = np.flatnonzero(self.status != OK)[:failed_limit]
        return {
            "rows": len(self),
            "by_status": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
            "by_partition": by_table,
            "similarity": {
                "rows": int(len(sims)),
                "mean": round(float(sims.mean()), 4) if len(sims) else None,
                "histogram": histogram,
            },
            "failed": [
                {k: self.row(int(i))[k] for k in ("key", "table", "status", "error", "caption")}
                for i in failed
            ],
            "failed_total": int((self.status != OK).sum()),
        }


def load_catalog(
    root: str, storage: StorageOptions | None = None, with_vectors: bool = False
) -> RowCatalog:
    """Read the catalog of every table under ``root`` (and the image vectors, for brute
    force), one file at a time."""
    tables = open_tables(root, storage)
    base = root.rstrip("/")
    names = [t.dest.rstrip("/")[len(base) :].lstrip("/") for t in tables]
    model = _one_model(tables)
    files: list[FileInfo] = []
    parts: list[pa.Table] = []
    vectors: list[np.ndarray] = []
    valid: list[np.ndarray] = []
    start = 0
    columns = list(COLUMNS) + (["image_embedding"] if with_vectors else [])
    for table, name in zip(tables, names, strict=True):
        for file in table.files:
            part = table.read(file, columns)
            if with_vectors:
                mat, ok = embedding_matrix(part.column("image_embedding"))
                vectors.append(mat.astype(np.float16))
                valid.append(ok)
                part = part.drop_columns(["image_embedding"])
            parts.append(part.select(list(COLUMNS)))
            files.append(_info(name, table, file, start, part.num_rows))
            start += part.num_rows
    rows = pa.concat_tables(parts) if parts else pa.table({c: [] for c in COLUMNS})
    file_of = np.repeat(np.arange(len(files)), [f.rows for f in files])
    table_index = {name: i for i, name in enumerate(names)}
    table_of = np.array([table_index[f.table] for f in files], np.int32)[file_of]
    keys = rows.column("key").to_pylist()
    by_key = {
        (files[f].table, k): i for i, (f, k) in enumerate(zip(file_of.tolist(), keys, strict=True))
    }
    sims = pc.fill_null(rows.column("similarity").cast(pa.float32()), float("nan"))
    catalog = RowCatalog(
        root=root,
        tables=names,
        files=files,
        rows=rows,
        file_of=file_of,
        table_of=table_of,
        by_key=by_key,
        model=model,
        status=np.asarray(rows.column("status").to_pylist(), dtype=object),
        similarity=sims.to_numpy(zero_copy_only=False).astype(np.float32),
    )
    if with_vectors:
        dim = int(model["embed_dim"])
        catalog.vectors = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float16)
        catalog.has_vector = np.concatenate(valid) if valid else np.zeros(0, bool)
    log.info("catalog of %s: %d rows in %d file(s)", root, len(catalog), len(files))
    return catalog


def _info(table_name: str, table: OutputTable, file: ShardFile, start: int, rows: int) -> FileInfo:
    return FileInfo(table_name, table.dest, file.name, start, rows, file.metadata or {})


def _one_model(tables: list[OutputTable]) -> dict[str, Any]:
    models = {(m["name"], m["checkpoint_sha256"]) for m in (t.model_metadata() for t in tables)}
    if len(models) > 1:
        raise ClipbatchError(
            f"the tables under this root were written by different models {sorted(models)}; "
            "serve one model's tables at a time"
        )
    return tables[0].model_metadata()
