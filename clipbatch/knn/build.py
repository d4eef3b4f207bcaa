"""Build a kNN index of a table's vectors, and keep it current as partitions arrive.

FAISS directly, not autofaiss: autofaiss reads whole files (every column), fails on a
single null vector ("Expected all lists to be of size=64"), and numbers vectors by file
order without recording which row each is. Here only the key and the vector column are
read, one file at a time; rows without a vector (a failed image) are skipped; every id
maps to its table, file, row and key (``ids.parquet``).

**Index.** Cosine similarity, as an inner product over L2-normalised vectors. ``auto``
picks, by the number of vectors N: below ``FLAT_BELOW`` an exact ``Flat`` index (small
tables need nothing faster); up to ``SQ8_ABOVE``, ``IVF{nlist},Flat`` with nlist about
4 sqrt(N) (a power of two) and ``nprobe`` nlist/16 (recall@10 >= 0.95 on clustered
vectors: bench/knn.py); above it ``IVF{nlist},SQ8``, a quarter of the memory. Any FAISS
factory string can be given instead.

**Keeping it current.** A build records the snapshot it was built from: every shard
file's table, name, version and fingerprint. The next build compares it with the
tables now: files that are gone or were rewritten have their ids removed, new and
rewritten files are added with new ids, and the trained quantizer is kept. It rebuilds
from scratch instead (the documented policy) when the number of vectors has grown more
than ``REBUILD_GROWTH`` times since the quantizer was trained (its lists would be
unbalanced), when the table's model or dimension changed, when a Flat index outgrew
``FLAT_BELOW``, or when asked (``rebuild``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipbatch import __version__
from clipbatch.config import StorageOptions
from clipbatch.errors import ConfigError
from clipbatch.io.storage import read_parquet_columns
from clipbatch.knn.store import IDS_SCHEMA, StoredBuild, commit_build, ids_bytes, read_current
from clipbatch.knn.tables import Snapshot, TableFile, snapshot
from clipbatch.query.table import embedding_matrix, normalize_rows
from clipbatch.sink.schema import decode_metadata

log = logging.getLogger(__name__)

COLUMNS = {"image": "image_embedding", "text": "text_embedding"}
FLAT_BELOW = 20_000
SQ8_ABOVE = 5_000_000
REBUILD_GROWTH = 2.0
TRAIN_PER_LIST = 40  # FAISS wants about 39 training points per IVF list, at least
MAX_TRAIN = 200_000
# A build from scratch holds the vectors it reads, up to this, to add them without
# reading the files again; past it, it drops them and reads the files a second time.
HOLD_BYTES = 1 << 30


class NoVectorsError(ConfigError):
    """No row under the root has the vector an index is asked for."""


@dataclass(frozen=True)
class IndexSettings:
    factory: str = "auto"  # "auto", or a FAISS factory string such as "IVF1024,Flat"
    nprobe: int | None = None  # IVF lists searched per query; None: nlist / 16
    rebuild: bool = False  # from scratch, even when an incremental update would do


@dataclass
class BuildReport:
    name: str
    root: str
    mode: str  # built | updated | current | skipped
    vectors: int
    added: int = 0
    removed: int = 0
    files: int = 0
    seconds: float = 0.0
    factory: str = ""
    version: str | None = None
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def faiss_module() -> Any:
    try:
        import faiss
    except ImportError as e:
        raise ConfigError("kNN indexes need faiss: pip install 'clipbatch[knn]'") from e
    return faiss


def auto_factory(vectors: int) -> str:
    if vectors < FLAT_BELOW:
        return "Flat"
    nlist = 2 ** round(math.log2(max(16.0, 4 * math.sqrt(vectors))))
    return f"IVF{nlist},{'SQ8' if vectors > SQ8_ABOVE else 'Flat'}"


def default_nprobe(factory: str) -> int:
    nlist = ivf_lists(factory)
    return max(1, nlist // 16) if nlist else 1


def ivf_lists(factory: str) -> int:
    head = factory.split(",", 1)[0]
    return int(head[3:]) if head.startswith("IVF") and head[3:].isdigit() else 0


# -- reading vectors ------------------------------------------------------------------


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


class _OneModel:
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


# -- building -------------------------------------------------------------------------


def build_index(
    root: str,
    name: str = "image",
    settings: IndexSettings | None = None,
    storage: StorageOptions | None = None,
    run_meta: dict[str, Any] | None = None,
) -> BuildReport:
    """Build (or update) the index ``name`` ("image" or "text") of the tables under ``root``."""
    faiss = faiss_module()
    settings = settings or IndexSettings()
    if name not in COLUMNS:
        raise ConfigError(f"index name {name!r}: one of {', '.join(COLUMNS)}")
    column = COLUMNS[name]
    start = time.perf_counter()
    snap = snapshot(root, storage)
    current = read_current(root, name, storage)
    reasons = [] if current is None else _rebuild_reasons(current, snap, settings)
    report = None
    if current is not None and not reasons:
        old = {f["key"]: f for f in current.info["files"]}
        now = snap.by_key()
        gone = [k for k, f in old.items() if k not in now or now[k].version != f["version"]]
        new = [f for k, f in now.items() if k not in old or old[k]["version"] != f.version]
        if not gone and not new:
            return BuildReport(name, root, "current", current.info["vectors"], files=len(now))
        try:
            report = _update(faiss, current, snap, column, gone, new, settings, storage, run_meta)
        except ModelChangedError:
            reasons = ["the table's model changed"]
    if report is None:
        report = _build(faiss, snap, name, column, settings, storage, run_meta, current)
        report.reasons = reasons or ["no index yet"]
    report.seconds = round(time.perf_counter() - start, 3)
    return report


def build_indexes(
    root: str,
    names: list[str] | None = None,
    settings: IndexSettings | None = None,
    storage: StorageOptions | None = None,
    run_meta: dict[str, Any] | None = None,
) -> list[BuildReport]:
    """Build or update the named indexes (default: image and text)."""
    return [
        build_or_skip(root, name, names is not None, settings, storage, run_meta)
        for name in names or list(COLUMNS)
    ]


def build_or_skip(
    root: str,
    name: str,
    required: bool,
    settings: IndexSettings | None = None,
    storage: StorageOptions | None = None,
    run_meta: dict[str, Any] | None = None,
) -> BuildReport:
    """:func:`build_index`; an index not ``required`` whose vectors no row has (a table
    without captions has no text vectors) is reported skipped instead of raising
    :class:`NoVectorsError`."""
    try:
        return build_index(root, name, settings, storage, run_meta)
    except NoVectorsError as e:
        if required:
            raise
        log.info("%s", e)
        return BuildReport(name, root, "skipped", 0, reasons=[str(e)])


def _rebuild_reasons(current: StoredBuild, snap: Snapshot, settings: IndexSettings) -> list[str]:
    info = current.info
    reasons = []
    if settings.rebuild:
        reasons.append("asked to")
    if settings.factory != "auto" and settings.factory != info.get("factory"):
        reasons.append(f"another factory ({settings.factory})")
    total = sum(f.get("vectors", 0) for f in info["files"])  # an estimate before reading
    now = {f.key for f in snap.files}
    growth = len(now - {f["key"] for f in info["files"]}) / max(1, len(info["files"]))
    trained = info.get("trained_on") if ivf_lists(info.get("factory", "")) else None
    if trained and (1 + growth) * total > REBUILD_GROWTH * trained:
        reasons.append(f"the table grew more than {REBUILD_GROWTH}x since the index was trained")
    if info.get("factory") == "Flat" and settings.factory == "auto":
        expected = (1 + growth) * total
        if expected >= FLAT_BELOW:
            reasons.append(f"about {int(expected):,} vectors: past an exact index")
    return reasons


def _build(
    faiss: Any,
    snap: Snapshot,
    name: str,
    column: str,
    settings: IndexSettings,
    storage: StorageOptions | None,
    run_meta: dict[str, Any] | None,
    parent: StoredBuild | None,
) -> BuildReport:
    """From scratch: one pass to count, and sample for training; a second to add,
    unless every vector fit in ``HOLD_BYTES`` during the first (then one pass)."""
    counts: dict[str, int] = {}
    sample: list[np.ndarray] = []
    sampled = 0
    stride = 1  # every stride-th vector of each file is sampled: uniform over the table
    held: list[FileVectors] | None = []
    held_bytes = 0
    model = _OneModel(snap.root)
    for fv in _iter_vectors(snap, snap.files, column):
        model.check(fv)
        counts[fv.file.key] = len(fv.rows)
        if not len(fv.rows):
            continue
        sample.append(fv.vectors[::stride])
        sampled += len(sample[-1])
        # Bounded memory: at most 2 x MAX_TRAIN sampled, thinned evenly as files arrive.
        if sampled > 2 * MAX_TRAIN:
            sample = [np.concatenate(sample)[::2]]
            sampled = len(sample[0])
            stride *= 2
        if held is not None:
            held_bytes += fv.vectors.nbytes
            if held_bytes <= HOLD_BYTES:
                held.append(fv)
            else:
                held = None
    total = sum(counts.values())
    if total == 0:
        raise NoVectorsError(f"{snap.root}: no row has a {column} vector to index")
    factory = auto_factory(total) if settings.factory == "auto" else settings.factory
    dim = int(sample[0].shape[1])
    index = faiss.index_factory(dim, _with_ids(factory), faiss.METRIC_INNER_PRODUCT)
    train = np.concatenate(sample)
    del sample
    if not index.is_trained:
        want = min(MAX_TRAIN, max(TRAIN_PER_LIST * ivf_lists(factory), 10_000))
        if len(train) > want:
            train = train[np.random.default_rng(0).choice(len(train), want, replace=False)]
        index.train(train)
    trained_on = total
    del train
    ids = _Ids()
    for fv in held if held is not None else _iter_vectors(snap, snap.files, column):
        if len(fv.rows):
            index.add_with_ids(fv.vectors, ids.assign(fv))
    del held
    info = _info(
        snap, name, column, model.model or {}, factory, settings, index, counts, trained_on,
        run_meta, ids.next,
    )  # fmt: skip
    info["parent"] = parent.version if parent else None
    build = _commit(faiss, snap, name, index, ids, info, storage)
    return BuildReport(
        name, snap.root, "built", int(index.ntotal), added=int(index.ntotal),
        files=len(snap.files), factory=factory, version=build.version,
    )  # fmt: skip


def _update(
    faiss: Any,
    current: StoredBuild,
    snap: Snapshot,
    column: str,
    gone: list[str],
    new: list[TableFile],
    settings: IndexSettings,
    storage: StorageOptions | None,
    run_meta: dict[str, Any] | None,
) -> BuildReport:
    """Incremental: drop the ids of files gone or rewritten, add new and rewritten files."""
    info = current.info
    index = faiss.deserialize_index(np.frombuffer(current.read("index.faiss", storage), np.uint8))
    old_ids = current.ids(storage)
    file_keys = pc.binary_join_element_wise(old_ids.column("table"), old_ids.column("file"), "/")
    file_keys = pc.if_else(pc.equal(old_ids.column("table"), ""), old_ids.column("file"), file_keys)
    drop = pc.is_in(file_keys, value_set=pa.array(gone, type=pa.string()))
    removed = 0
    if gone:
        doomed = pc.filter(old_ids.column("id"), drop).to_numpy()
        removed = int(index.remove_ids(faiss.IDSelectorBatch(doomed.astype(np.int64))))
    kept = old_ids.filter(pc.invert(drop))
    ids = _Ids(start=int(info.get("next_id", 0)), kept=kept)
    gone_keys = set(gone)
    counts = {f["key"]: f.get("vectors", 0) for f in info["files"] if f["key"] not in gone_keys}
    model = _OneModel(snap.root, info.get("model"))
    for fv in _iter_vectors(snap, new, column):
        model.check(fv)  # another model: ModelChangedError, and build_index rebuilds
        counts[fv.file.key] = len(fv.rows)
        if len(fv.rows):
            index.add_with_ids(fv.vectors, ids.assign(fv))
    factory = info["factory"]
    trained = info.get("trained_on", 0)
    out = _info(
        snap, current.name, column, model.model or {}, factory, settings, index, counts, trained, run_meta,
        ids.next,
    )  # fmt: skip
    out["parent"] = current.version
    build = _commit(faiss, snap, current.name, index, ids, out, storage)
    return BuildReport(
        current.name, snap.root, "updated", int(index.ntotal), added=ids.added, removed=removed,
        files=len(snap.files), factory=factory, version=build.version,
    )  # fmt: skip


def _commit(
    faiss: Any,
    snap: Snapshot,
    name: str,
    index: Any,
    ids: _Ids,
    info: dict[str, Any],
    storage: StorageOptions | None,
) -> StoredBuild:
    index_bytes = faiss.serialize_index(index).tobytes()
    return commit_build(snap.root, name, index_bytes, ids.to_bytes(), info, storage)


def _with_ids(factory: str) -> str:
    # IVF indexes take ids themselves; a Flat one needs the map (IDMap2 also removes).
    return factory if factory.startswith("IVF") else f"IDMap2,{factory}"


def _iter_vectors(snap: Snapshot, files: list[TableFile], column: str) -> Iterator[FileVectors]:
    return (read_vectors(snap, file, column) for file in files)


class _Ids:
    """Id -> (table, file, row, key), appended as vectors are added."""

    def __init__(self, start: int = 0, kept: pa.Table | None = None) -> None:
        self.next = start
        self.added = 0
        self.parts: list[pa.Table] = [kept] if kept is not None else []

    def assign(self, fv: FileVectors) -> np.ndarray:
        n = len(fv.rows)
        ids = np.arange(self.next, self.next + n, dtype=np.int64)
        self.next += n
        self.added += n
        self.parts.append(
            pa.table(
                {
                    "id": ids,
                    "table": [fv.file.table] * n,
                    "file": [fv.file.name] * n,
                    "row": fv.rows.astype(np.int32),
                    "key": fv.keys,
                },
                schema=IDS_SCHEMA,
            )
        )
        return ids

    def to_bytes(self) -> bytes:
        table = pa.concat_tables(self.parts) if self.parts else IDS_SCHEMA.empty_table()
        return ids_bytes(table)


def _info(
    snap: Snapshot,
    name: str,
    column: str,
    model: dict[str, Any],
    factory: str,
    settings: IndexSettings,
    index: Any,
    counts: dict[str, int],
    trained_on: int,
    run_meta: dict[str, Any] | None,
    next_id: int,
) -> dict[str, Any]:
    return {
        "package_version": __version__,
        "name": name,
        "column": column,
        "root": snap.root,
        "model": model,
        "metric": "cosine (inner product of L2-normalised vectors)",
        "factory": factory,
        "nprobe": settings.nprobe or default_nprobe(factory),
        "dim": int(index.d),
        "vectors": int(index.ntotal),
        "trained_on": trained_on,
        "next_id": next_id,  # ids are never reused: a removed vector's id stays retired
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run": dict(run_meta or {}),
        "tables": snap.tables,
        "files": [
            {
                "key": f.key,
                "table": f.table,
                "file": f.name,
                "version": f.version,
                "fingerprint": f.fingerprint,
                "vectors": counts.get(f.key, 0),
            }
            for f in snap.files
        ],
    }
