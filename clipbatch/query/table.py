"""Reading an output table back: text->image search and table validation.

Works from the table alone (local or any fsspec URL): the model is the one named in
the files' ``clipbatch`` metadata, loaded by name and checked against the recorded
checkpoint sha256, so a query is always encoded by the model that wrote the vectors.
Shard files are read one at a time, so memory stays bounded by the largest shard.
"""

from __future__ import annotations

import heapq
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.config import ModelConfig, SinkConfig, StorageOptions
from clipbatch.errors import ClipbatchError, ConfigError
from clipbatch.io.storage import get_fs, with_retries
from clipbatch.records import VECTOR_KEEP_RULES
from clipbatch.sink.commits import (
    COMMITS_DIR,
    LEGACY_MANIFEST,
    CommitRecord,
    all_records,
    file_version,
)
from clipbatch.sink.schema import decode_metadata

log = logging.getLogger(__name__)

# fp16 storage rounds each component; a unit vector stored in fp16 has a norm within
# about 1e-3 of 1. Anything further off was not normalised, or was corrupted.
NORM_TOLERANCE = 1e-2
SIMILARITY_TOLERANCE = 1e-2


class TableError(ClipbatchError):
    """The destination holds no readable embedding table."""


@dataclass(frozen=True)
class ShardFile:
    name: str  # e.g. 00000.parquet
    path: str  # the path on ``fs``
    rows: int
    metadata: dict[str, Any] | None
    schema: pa.Schema
    version: str | None = None  # as the listing reports it (what the commit index binds to)


@dataclass
class OutputTable:
    """The shard files under ``dest`` (bookkeeping names starting with '_' excluded)."""

    dest: str
    fs: Any
    root: str
    files: list[ShardFile]
    storage: StorageOptions | None = None

    def read(self, file: ShardFile, columns: Sequence[str] | None = None) -> pa.Table:
        return with_retries(
            lambda: pq.read_table(file.path, columns=columns, filesystem=self.fs),
            f"read {file.name}",
        )

    def iter_tables(self, columns: Sequence[str] | None = None) -> Iterator[pa.Table]:
        for file in self.files:
            yield self.read(file, columns)

    def read_all(self, columns: Sequence[str] | None = None) -> pa.Table:
        """Every shard, concatenated in shard order (small tables, tests, metrics)."""
        return pa.concat_tables(list(self.iter_tables(columns)))

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    def model_metadata(self) -> dict[str, Any]:
        """The one model every shard was written with; raises TableError if they differ."""
        models = {
            (m["model"]["name"], m["model"]["checkpoint_sha256"])
            for m in (f.metadata for f in self.files)
            if m and "model" in m
        }
        if not models:
            raise TableError(f"{self.dest}: no shard carries clipbatch model metadata")
        if len(models) > 1:
            raise TableError(
                f"{self.dest}: shards were written by different models {sorted(models)}; "
                "their vectors are not comparable"
            )
        return next(m["model"] for m in (f.metadata for f in self.files) if m and "model" in m)

    def sink(self) -> SinkConfig:
        """The table as a sink, for reading its commit index."""
        return SinkConfig(url=self.dest, storage=self.storage or StorageOptions())


def open_table(dest: str, storage: StorageOptions | None = None) -> OutputTable:
    """List and read the footers of the shard files under ``dest``."""
    fs, root = get_fs(dest, storage)
    root = root.rstrip("/")
    try:
        listing = with_retries(lambda: fs.ls(root, detail=True), f"list {dest}")
    except FileNotFoundError as e:
        raise TableError(f"{dest} does not exist") from e
    entries = sorted((e for e in listing if _is_shard_file(e["name"])), key=lambda e: e["name"])
    if not entries:
        raise TableError(f"{dest} holds no shard files (*.parquet)")
    files = []
    for e in entries:
        p = e["name"]
        meta = with_retries(lambda p=p: pq.read_metadata(p, filesystem=fs), f"read footer {p}")
        files.append(
            ShardFile(
                name=p.rsplit("/", 1)[-1],
                path=p,
                rows=meta.num_rows,
                metadata=decode_metadata(meta.metadata),
                schema=meta.schema.to_arrow_schema(),
                version=file_version(e, fs, p),
            )
        )
    return OutputTable(dest=dest, fs=fs, root=root, files=files, storage=storage)


def _is_shard_file(path: str) -> bool:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.endswith(".parquet") and not name.startswith(("_", "."))


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A fixed_size_list column as float32 [n, d] (zeros where null), and its validity mask."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dim = arr.type.list_size
    values = arr.values.slice(arr.offset * dim, len(arr) * dim)
    mat = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), dim)
    valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)
    mat[~valid] = 0.0
    return mat, valid


def normalize_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# -- search --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    query: str
    rank: int
    key: str
    caption: str | None
    score: float  # cosine similarity


def model_config_for(table: OutputTable, storage: StorageOptions | None = None) -> ModelConfig:
    """The model that wrote ``table``, pinned to its recorded checkpoint sha256.

    A transformers hub model named without a revision is pinned to the revision that wrote
    the table, so a newer upload on the hub cannot answer the query. The caption limit is
    the one the table was written with.
    """
    from clipbatch.models.names import HUB, parse_model_name

    model = table.model_metadata()
    name = model["name"]
    parsed = parse_model_name(name)
    hub_unpinned = parsed.family == "hf" and parsed.form == HUB and not parsed.revision
    if hub_unpinned and model.get("revision"):
        name = f"{name}@{model['revision']}"
    limit = model.get("context_length")
    return ModelConfig(
        name=name,
        checkpoint_sha256=model["checkpoint_sha256"],
        max_caption_tokens=int(limit) if limit else None,
        storage=storage or StorageOptions(),
    )


class TextQueryEncoder:
    """Encodes queries with the table's own model, through the pipeline's text path."""

    def __init__(
        self, table: OutputTable, device: str = "cpu", storage: StorageOptions | None = None
    ) -> None:
        from clipbatch.encode.encoder import ClipEncoder
        from clipbatch.models.loading import load_model

        meta = table.model_metadata()
        config = model_config_for(table, storage)
        self.loaded = load_model(config, device)
        if self.loaded.embed_dim != meta["embed_dim"]:
            raise ConfigError(
                f"model {meta['name']!r} has embedding dim {self.loaded.embed_dim}, "
                f"the table {meta['embed_dim']}"
            )
        recorded = meta.get("config_sha256")
        if recorded and recorded != self.loaded.checkpoint.config_sha256:
            raise ConfigError(
                f"model {meta['name']!r}: its config files (tokenizer, preprocessing) have "
                f"sha256 {self.loaded.checkpoint.config_sha256}, the table was written with "
                f"{recorded}"
            )
        self.encoder = ClipEncoder(
            self.loaded, batch_size=64, context_tokens=config.max_caption_tokens
        )

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        emb, _ = self.encoder.encode_texts(list(texts))
        return normalize_rows(emb)


def search(
    table: OutputTable,
    queries: Sequence[str],
    k: int = 5,
    device: str = "cpu",
    storage: StorageOptions | None = None,
) -> list[list[Hit]]:
    """Top-``k`` images for each text query, by cosine, streaming shard by shard."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    q = TextQueryEncoder(table, device, storage)(queries)
    heaps: list[list[tuple[float, int, str, str | None]]] = [[] for _ in queries]
    seq = 0
    for part in table.iter_tables(["key", "caption", "image_embedding"]):
        emb, valid = embedding_matrix(part.column("image_embedding"))
        if not valid.any():
            continue
        idx = np.flatnonzero(valid)
        scores = q @ normalize_rows(emb[idx]).T  # [queries, rows]
        keys = part.column("key").to_pylist()
        captions = part.column("caption").to_pylist()
        for qi in range(len(queries)):
            top = np.argsort(-scores[qi])[:k]
            for j in top:
                row = int(idx[j])
                # seq breaks ties in table order, so results are deterministic.
                item = (float(scores[qi, j]), -seq - row, keys[row], captions[row])
                if len(heaps[qi]) < k:
                    heapq.heappush(heaps[qi], item)
                else:
                    heapq.heappushpop(heaps[qi], item)
        seq += part.num_rows
    return [
        [
            Hit(query=queries[qi], rank=r + 1, key=key, caption=cap, score=score)
            for r, (score, _, key, cap) in enumerate(sorted(heaps[qi], reverse=True))
        ]
        for qi in range(len(queries))
    ]


# -- validation ----------------------------------------------------------------------------


@dataclass
class Report:
    """What ``clipbatch inspect`` prints; ``problems`` non-empty means inconsistent."""

    dest: str
    shards: int = 0
    rows: int = 0
    status_counts: Counter = field(default_factory=Counter)
    dtypes: set[str] = field(default_factory=set)
    models: set[tuple[str, str]] = field(default_factory=set)
    embed_dims: set[int] = field(default_factory=set)
    norm_min: float = float("inf")
    norm_max: float = float("-inf")
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(table: OutputTable) -> Report:
    """Check every shard against its own metadata, the commit index, and the table contracts."""
    report = Report(dest=table.dest, shards=len(table.files))
    seen: dict[str, str] = {}
    duplicates: Counter = Counter()
    for file in table.files:
        _validate_file(table, file, report, seen, duplicates)
    for key, n in sorted(duplicates.items())[:5]:
        report.problems.append(f"key {key!r} appears {n + 1} times (first in {seen[key]})")
    if len(duplicates) > 5:
        report.problems.append(f"... and {len(duplicates) - 5} more duplicate keys")
    if len(report.models) > 1:
        report.problems.append(f"shards were written by different models: {sorted(report.models)}")
    if len(report.dtypes) > 1:
        report.problems.append(f"shards use different embedding dtypes: {sorted(report.dtypes)}")
    _validate_index(table, report)
    return report


def _validate_file(
    table: OutputTable, file: ShardFile, report: Report, seen: dict[str, str], dups: Counter
) -> None:
    name = file.name
    meta = file.metadata
    report.rows += file.rows
    if meta is None:
        report.problems.append(f"{name}: no clipbatch metadata in the footer")
        return
    model = meta.get("model", {})
    report.models.add((str(model.get("name")), str(model.get("checkpoint_sha256"))))
    report.dtypes.add(str(meta.get("dtype")))
    if meta.get("rows") != file.rows:
        report.problems.append(
            f"{name}: {file.rows} rows, but its metadata says {meta.get('rows')}"
        )
    data = table.read(file)
    counts = Counter(data.column("status").to_pylist())
    report.status_counts.update(counts)
    if dict(counts) != dict(meta.get("counts") or {}):
        report.problems.append(
            f"{name}: status counts {dict(counts)} differ from its metadata {meta.get('counts')}"
        )
    keys = data.column("key").to_pylist()
    if any(k is None for k in keys):
        report.problems.append(f"{name}: null keys")
    for key in keys:
        if key in seen:
            dups[key] += 1
        else:
            seen[key] = name
    statuses = data.column("status").to_pylist()
    mats = {}
    for column in ("image_embedding", "text_embedding"):
        if column not in data.column_names:
            report.problems.append(f"{name}: no {column} column")
            continue
        typ = data.schema.field(column).type
        dim = typ.list_size
        report.embed_dims.add(dim)
        if model.get("embed_dim") not in (None, dim):
            report.problems.append(
                f"{name}: {column} has dim {dim}, metadata says {model['embed_dim']}"
            )
        stored = "float16" if typ.value_type == pa.float16() else "float32"
        if stored != meta.get("dtype"):
            report.problems.append(
                f"{name}: {column} is {stored}, metadata says {meta.get('dtype')}"
            )
        mat, valid = embedding_matrix(data.column(column))
        mats[column] = (mat, valid)
        # The keep rule of records.py: a caption problem keeps the image vector, an image
        # problem the text vector; any other failure has none.
        keep = VECTOR_KEEP_RULES[column]
        allowed = np.asarray([keep(s) for s in statuses], bool)
        failed_with_vectors = int((valid & ~allowed).sum())
        if failed_with_vectors:
            kinds = sorted(
                {s for s, v, a in zip(statuses, valid, allowed, strict=True) if v and not a}
            )
            report.problems.append(
                f"{name}: {failed_with_vectors} failed rows carry an {column} vector "
                f"their status does not allow ({', '.join(kinds)})"
            )
        if valid.any():
            norms = np.linalg.norm(mat[valid], axis=1)
            if not np.isfinite(norms).all():
                report.problems.append(f"{name}: non-finite values in {column}")
                continue
            report.norm_min = min(report.norm_min, float(norms.min()))
            report.norm_max = max(report.norm_max, float(norms.max()))
            if meta.get("normalized"):
                off = int((np.abs(norms - 1) > NORM_TOLERANCE).sum())
                if off:
                    report.problems.append(
                        f"{name}: {off} {column} vectors are not unit length "
                        f"(norms {norms.min():.4f}..{norms.max():.4f}), though the metadata "
                        "says normalized"
                    )
    if len(mats) == 2 and "similarity" in data.column_names:
        (img, iv), (txt, tv) = mats["image_embedding"], mats["text_embedding"]
        both = iv & tv
        sim_col = data.column("similarity")
        has_sim = np.asarray(sim_col.is_valid().to_numpy(zero_copy_only=False), bool)
        orphans = int((has_sim & ~both).sum())
        if orphans:
            report.problems.append(f"{name}: {orphans} rows have a similarity but not both vectors")
        sim = np.asarray(sim_col.to_numpy(zero_copy_only=False), np.float32)
        expected = np.sum(normalize_rows(img) * normalize_rows(txt), axis=1)
        off = int((np.abs(sim[both] - expected[both]) > SIMILARITY_TOLERANCE).sum())
        if off:
            report.problems.append(
                f"{name}: {off} rows have a similarity that is not the cosine of their vectors"
            )


def _validate_index(table: OutputTable, report: Report) -> None:
    """Cross-check the commit index (``_commits/``, or a legacy ``_manifest.json``) with the files.

    A record describes one file version. A file whose version has no record yet is a
    commit the index has not caught up with (a crash, or a run still going): a note,
    since the next run adopts it from its footer. A record whose row count differs from
    its file, or that names a file that is gone, is a problem.
    """
    records = all_records(table.sink())
    if not records:
        report.notes.append(f"no commit index ({COMMITS_DIR}/ or {LEGACY_MANIFEST})")
        return
    by_shard: dict[str, list[CommitRecord]] = {}
    for rec in records:
        by_shard.setdefault(rec.shard, []).append(rec)
    files = {f.name.removesuffix(".parquet"): f for f in table.files}
    for shard, recs in sorted(by_shard.items()):
        file = files.get(shard)
        where = LEGACY_MANIFEST if all(r.file_version is None for r in recs) else "commit index"
        if file is None:
            report.problems.append(f"{where} lists shard {shard}, but its file is missing")
            continue
        exact = [r for r in recs if r.file_version == file.version]
        rec = (exact or [r for r in recs if r.file_version is None] or recs)[-1]
        if rec.rows != file.rows:
            changed = "" if exact or rec.file_version is None else " (changed since its commit)"
            report.problems.append(
                f"{where} says shard {shard} has {rec.rows} rows, its file {file.rows}{changed}"
            )
    for shard in sorted(set(files) - set(by_shard)):
        report.notes.append(
            f"{shard}.parquet is not in the commit index yet (the next run adopts it)"
        )
