"""Semantic deduplication (SemDeDup) across a root, incremental night after night.

Rows whose image vectors are closer than a cosine distance ``eps`` (cosine >= 1 - eps)
are duplicates; a duplicate group keeps its earliest row (rank 0) and ranks the others
after it. As in SemDeDup (Abbas et al., 2023, and NeMo Curator's), vectors are first
clustered with k-means (FAISS) and compared only within their cluster, so the cost is
about N x (N / k) instead of N², and memory holds one bucket of clusters at a time.

**Incremental, and stable.** The centroids are trained once (on a bounded, evenly
thinned sample of every vector) and kept. A later run assigns only the rows of new and
rewritten shard files to clusters, and compares each with the earlier rows of its
cluster and with the new rows before it: tonight's rows are checked against every
earlier night's, and a new row that duplicates an earlier one joins that row's group,
ranked after it. Earlier rows keep their groups and ranks: a selection made from them
yesterday is not pulled out from under anyone.

**Where things go.** Per shard file, like the heads' scores:
``{table}/_scores/semdedup-{eps}/{shard}.parquet`` with ``key``, ``file``, ``cluster``,
``group`` (the group's first row: ``table/key``) and ``rank``; rows without a vector have
nulls. The state under ``{root}/_semdedup/semdedup-{eps}/``: ``state.json`` (the
centroids' sha256, the committed parts, every file done with its version; written last,
so a crash leaves the previous state, and the crashed run's parts are ignored and
removed), ``centroids.npy``, and the rows with their vectors, groups and ranks in parts
``parts/{run}/bucket-NNN.parquet`` (bucket = cluster modulo ``buckets``), compacted into
one part when there are more than ``MAX_PARTS``.

Example::

    from clipbatch.judge.semdedup import SemDedupSettings, semdedup_root

    report = semdedup_root("s3://bucket/emb", SemDedupSettings(eps=0.05))
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipbatch.config import StorageOptions
from clipbatch.errors import ConfigError
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs, join, read_bytes, remove_quietly, write_bytes_atomic
from clipbatch.judge.store import JudgementIndex, write_judgement
from clipbatch.knn.policy import faiss_module
from clipbatch.tables.snapshot import Snapshot, TableFile, snapshot
from clipbatch.tables.vectors import embedding_matrix, normalize_rows

log = logging.getLogger(__name__)

STATE_DIR = "_semdedup"
MAX_PARTS = 16
SPILL_BYTES = 256 << 20  # new rows held per run before spilling buckets to local disk
VECTORS_PER_CLUSTER = 1000  # auto k: about this many rows per cluster
RESULT_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("file", pa.string()),
        pa.field("cluster", pa.int32()),
        pa.field("group", pa.string()),
        pa.field("rank", pa.int32()),
    ]
)


@dataclass(frozen=True)
class SemDedupSettings:
    eps: float = 0.05  # cosine distance; 1 - eps is the cosine above which rows are duplicates
    clusters: int | None = None  # k; None: about one per VECTORS_PER_CLUSTER vectors
    column: str = "image_embedding"
    buckets: int = 64
    probes: int = 2  # each row is kept in its nearest clusters: pairs across a border are found
    train_sample: int = 100_000
    rebuild: bool = False  # train the centroids again and regroup every row

    @property
    def name(self) -> str:
        return f"semdedup-{self.eps:g}"

    def check(self) -> None:
        if not 0 < self.eps < 1:
            raise ConfigError(f"eps {self.eps} must be between 0 and 1 (a cosine distance)")
        if self.clusters is not None and self.clusters < 1:
            raise ConfigError("clusters must be at least 1")
        if self.probes < 1:
            raise ConfigError("probes must be at least 1")


@dataclass
class SemDedupReport:
    root: str
    name: str
    files_new: int = 0
    rows_new: int = 0
    duplicates_new: int = 0  # new rows ranked after an earlier row
    clusters: int = 0
    trained: bool = False
    seconds: float = 0.0
    pairs: list[tuple[str, str]] = field(default_factory=list)  # only with collect_pairs

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "pairs"}


@dataclass
class _State:
    centroids_sha256: str = ""
    clusters: int = 0
    trained_on: int = 0
    parts: list[str] = field(default_factory=list)
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # table/file -> {version}


def semdedup_root(
    root: str,
    settings: SemDedupSettings | None = None,
    storage: StorageOptions | None = None,
    run_meta: dict[str, Any] | None = None,
    collect_pairs: bool = False,
) -> SemDedupReport:
    """Group the duplicates among the rows of new and rewritten files under ``root``,
    against every earlier row; write each new file's groups beside its table.

    Example::

        from clipbatch.judge.semdedup import SemDedupSettings, semdedup_root

        report = semdedup_root("s3://bucket/emb/vit-b-32", SemDedupSettings(eps=0.05))
        report.rows_new, report.duplicates_new
    """
    settings = settings or SemDedupSettings()
    settings.check()
    start = time.perf_counter()
    faiss = faiss_module()
    snap = snapshot(root, storage)
    home = join(root, STATE_DIR, settings.name)
    state = None if settings.rebuild else _read_state(home, storage)
    report = SemDedupReport(root, settings.name)
    if state is None:
        state = _State()
        centroids = _train(faiss, snap, settings)
        state.clusters, state.trained_on = len(centroids), _count(snap, settings)
        state.centroids_sha256 = _write_centroids(home, centroids, storage)
        report.trained = True
    else:
        centroids = _read_centroids(home, state, storage)
    report.clusters = len(centroids)
    _remove_orphan_parts(home, state, storage)
    current = {_file_key(f): f.version for f in snap.files}
    new_files = [
        f for f in snap.files if state.files.get(_file_key(f), {}).get("version") != f.version
    ]
    report.files_new = len(new_files)
    run = (run_meta or {}).get("run_id") or uuid.uuid4().hex[:12]
    part = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{str(run)[:12]}"
    with tempfile.TemporaryDirectory(prefix="clipbatch-semdedup-") as spill:
        buckets = _assign(faiss, snap, new_files, centroids, settings, Path(spill))
        # 1. Every new row's duplicates among earlier rows, bucket by bucket (a row kept in
        # several clusters is compared in each); 2. groups and ranks in the rows' order.
        links = _Links()
        for b in buckets.ids():
            old = _old_rows(home, state, b, current, storage)
            links.add_bucket(buckets.load(b), old, 1.0 - settings.eps)
        assigned = links.assign()
        if collect_pairs:
            report.pairs = links.pairs()
        results: dict[str, list[pa.Table]] = {}
        for b in buckets.ids():
            grouped = _with_groups(buckets.load(b), assigned)
            _write(join(home, "parts", part, f"bucket-{b:03d}.parquet"), grouped, storage)
            primary = grouped.filter(grouped.column("primary"))
            for file_key, rows in _by_file(primary).items():
                results.setdefault(file_key, []).append(rows)
    judge = f"{settings.name}/{state.centroids_sha256[:16]}"
    for file in new_files:
        _write_results(
            snap, file, results.get(_file_key(file), []), settings, judge, run_meta, storage, report
        )
    state.parts.append(part)
    for file in new_files:
        state.files[_file_key(file)] = {"version": file.version}
    for gone in set(state.files) - set(current):
        state.files.pop(gone)
    if len(state.parts) > MAX_PARTS:
        _compact(home, state, current, settings, part + "-compact", storage)
    _write_state(home, state, settings, storage)  # the commit point
    report.seconds = round(time.perf_counter() - start, 3)
    log.info(
        "%s: %d new row(s) in %d file(s), %d ranked after an earlier duplicate (%d clusters)",
        settings.name, report.rows_new, report.files_new, report.duplicates_new, report.clusters,
    )  # fmt: skip
    return report


# -- centroids ----------------------------------------------------------------------------


def _count(snap: Snapshot, settings: SemDedupSettings) -> int:
    return sum(len(_vectors(snap, f, settings)[0]) for f in snap.files)


def _train(faiss: Any, snap: Snapshot, settings: SemDedupSettings) -> np.ndarray:
    """k-means on an evenly thinned sample of every vector (bounded memory, as the kNN build)."""
    sample: list[np.ndarray] = []
    sampled, stride, total = 0, 1, 0
    for file in snap.files:
        _, vectors = _vectors(snap, file, settings)
        total += len(vectors)
        if not len(vectors):
            continue
        sample.append(vectors[::stride])
        sampled += len(sample[-1])
        if sampled > 2 * settings.train_sample:
            sample = [np.concatenate(sample)[::2]]
            sampled, stride = len(sample[0]), stride * 2
    if total == 0:
        raise ConfigError(f"{snap.root}: no row has a {settings.column} vector to deduplicate")
    data = np.ascontiguousarray(np.concatenate(sample), np.float32)
    k = settings.clusters or max(1, round(total / VECTORS_PER_CLUSTER))
    k = min(k, len(data))
    if k == 1:
        centroid = normalize_rows(data.mean(axis=0, keepdims=True))
        return centroid.astype(np.float32)
    kmeans = faiss.Kmeans(data.shape[1], k, niter=20, spherical=True, seed=1234, verbose=False)
    kmeans.train(data)
    return np.asarray(kmeans.centroids, np.float32)


def _write_centroids(home: str, centroids: np.ndarray, storage: StorageOptions | None) -> str:
    buf = io.BytesIO()
    np.save(buf, centroids)
    data = buf.getvalue()
    fs, path = get_fs(join(home, "centroids.npy"), storage)
    write_bytes_atomic(fs, path, data)
    return hashlib.sha256(data).hexdigest()


def _read_centroids(home: str, state: _State, storage: StorageOptions | None) -> np.ndarray:
    fs, path = get_fs(join(home, "centroids.npy"), storage)
    data = read_bytes(fs, path)
    if hashlib.sha256(data).hexdigest() != state.centroids_sha256:
        raise ConfigError(
            f"{home}/centroids.npy is not the one state.json records; run with rebuild"
        )
    return np.load(io.BytesIO(data))


# -- assigning new rows ---------------------------------------------------------------------


def _vectors(
    snap: Snapshot, file: TableFile, settings: SemDedupSettings
) -> tuple[pa.Table, np.ndarray]:
    """(key and row of the rows with a vector, their L2-normalised vectors) of one file."""
    from clipbatch.io.storage import read_parquet_columns

    data = read_parquet_columns(snap.fs, file.path, ["key", settings.column])
    if data is None:
        return pa.table(
            {"key": pa.array([], pa.string()), "row": pa.array([], pa.int32())}
        ), np.zeros((0, 1), np.float32)
    mat, valid = embedding_matrix(data.column(settings.column))
    rows = np.flatnonzero(valid)
    keys = data.column("key").take(pa.array(rows, pa.int64()))
    return pa.table({"key": keys, "row": pa.array(rows.astype(np.int32))}), normalize_rows(
        mat[rows]
    ).astype(np.float32)


class _Buckets:
    """New rows gathered by bucket, spilled to local disk past SPILL_BYTES: memory later
    holds one bucket at a time."""

    def __init__(self, spill: Path) -> None:
        self.spill = spill
        self.held: dict[int, list[pa.Table]] = {}
        self.held_bytes = 0
        self.files: dict[int, list[Path]] = {}

    def add(self, bucket: int, rows: pa.Table) -> None:
        self.held.setdefault(bucket, []).append(rows)
        self.held_bytes += rows.nbytes
        if self.held_bytes > SPILL_BYTES:
            for b, parts in self.held.items():
                path = self.spill / f"b{b:03d}-{len(self.files.get(b, []))}.parquet"
                pq.write_table(pa.concat_tables(parts), path)
                self.files.setdefault(b, []).append(path)
            self.held, self.held_bytes = {}, 0

    def ids(self) -> list[int]:
        return sorted(set(self.held) | set(self.files))

    def load(self, bucket: int) -> pa.Table:
        tables = [pq.read_table(p) for p in self.files.get(bucket, [])]
        return pa.concat_tables(tables + self.held.get(bucket, []))


def _assign(
    faiss: Any,
    snap: Snapshot,
    files: list[TableFile],
    centroids: np.ndarray,
    settings: SemDedupSettings,
    spill: Path,
) -> _Buckets:
    """The new rows, each in its ``probes`` nearest clusters (the nearest is its primary
    one), gathered by bucket."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    probes = min(settings.probes, len(centroids))
    out = _Buckets(spill)
    for file in files:
        meta, vectors = _vectors(snap, file, settings)
        if not len(vectors):
            continue
        _, nearest = index.search(vectors, probes)
        dim = vectors.shape[1]
        n = len(vectors)
        for p in range(probes):
            cluster = nearest[:, p].astype(np.int32)
            rows = pa.table(
                {
                    "table": pa.array([file.table] * n, pa.string()),
                    "file": pa.array([file.name] * n, pa.string()),
                    "version": pa.array([file.version] * n, pa.string()),
                    "row": meta.column("row"),
                    "key": meta.column("key"),
                    "cluster": pa.array(cluster),
                    "primary": pa.array(np.full(n, p == 0)),
                    "vector": pa.FixedSizeListArray.from_arrays(
                        pa.array(vectors.astype(np.float16).ravel()), dim
                    ),
                }
            )
            bucket = cluster % settings.buckets
            for b in np.unique(bucket).tolist():
                out.add(b, rows.filter(pa.array(bucket == b)))
    return out


# -- grouping ------------------------------------------------------------------------------


def _old_rows(
    home: str, state: _State, bucket: int, current: dict[str, str], storage: StorageOptions | None
) -> pa.Table | None:
    """Earlier rows of a bucket, from the committed parts, of files still current."""
    tables = []
    for part in state.parts:
        fs, path = get_fs(join(home, "parts", part, f"bucket-{bucket:03d}.parquet"), storage)
        try:
            tables.append(
                with_retries(
                    lambda path=path, fs=fs: pq.read_table(path, filesystem=fs), f"read {path}"
                )
            )
        except FileNotFoundError:
            continue
    if not tables:
        return None
    old = pa.concat_tables(tables)
    keys = _keys_of(old)
    versions = pa.array([current.get(k) for k in keys], pa.string())
    return old.filter(pc.equal(versions, old.column("version")).fill_null(False))


RowId = tuple[str, str, int]  # (table, file, row): also the rows' order


class _Links:
    """Duplicate links from new rows to earlier ones, then groups in the rows' order."""

    def __init__(self) -> None:
        self.earlier: dict[RowId, set[RowId]] = {}  # new row -> its earlier duplicates
        self.old_group: dict[RowId, str] = {}  # earlier runs' rows -> their group
        self.old_sizes: Counter = Counter()  # earlier runs' groups -> members
        self.new_rows: dict[RowId, str] = {}  # new row -> its key (for group names)
        self.old_keys: dict[RowId, str] = {}

    def add_bucket(self, new: pa.Table, old: pa.Table | None, threshold: float) -> None:
        new_ids = _ids(new)
        for rid, key in zip(new_ids, new.column("key").to_pylist(), strict=True):
            self.new_rows[rid] = key
            self.earlier.setdefault(rid, set())
        new_cluster = new.column("cluster").to_numpy()
        new_vectors = _matrix(new)
        old_ids: list[RowId] = []
        old_cluster = np.zeros(0, np.int32)
        if old is not None and old.num_rows:
            old_ids = _ids(old)
            old_cluster = old.column("cluster").to_numpy()
            old_vectors = _matrix(old)
            primary = old.column("primary").to_pylist()
            groups = old.column("group").to_pylist()
            keys = old.column("key").to_pylist()
            for rid, group, first, key in zip(old_ids, groups, primary, keys, strict=True):
                self.old_group[rid] = group
                self.old_keys[rid] = key
                if first:  # each earlier row counted once, in its primary cluster
                    self.old_sizes[group] += 1
        for c in np.unique(new_cluster).tolist():
            mine = np.flatnonzero(new_cluster == c)
            sims = new_vectors[mine] @ new_vectors[mine].T
            for a, b in zip(*np.nonzero(sims >= threshold), strict=True):
                i, j = new_ids[mine[a]], new_ids[mine[b]]
                if j < i:
                    self.earlier[i].add(j)
            theirs = np.flatnonzero(old_cluster == c)
            if len(theirs):
                sims = new_vectors[mine] @ old_vectors[theirs].T
                for a, b in zip(*np.nonzero(sims >= threshold), strict=True):
                    self.earlier[new_ids[mine[a]]].add(old_ids[theirs[b]])

    def assign(self) -> dict[RowId, tuple[str, int]]:
        """Each new row's (group, rank): the group of its earliest duplicate, ranked after
        every member before it; a row with no earlier duplicate starts its own group."""
        groups: dict[RowId, str] = dict(self.old_group)
        sizes = Counter(self.old_sizes)
        out = {}
        for rid in sorted(self.new_rows):
            before = self.earlier[rid]
            group = groups[min(before)] if before else _row_id(rid[0], self.new_rows[rid])
            groups[rid] = group
            out[rid] = (group, sizes[group])
            sizes[group] += 1
        return out

    def pairs(self) -> list[tuple[str, str]]:
        """Every link found, as (table/key, table/key) names."""
        keys = {**self.old_keys, **self.new_rows}
        return [
            (_row_id(i[0], keys[i]), _row_id(j[0], keys[j]))
            for i, js in self.earlier.items()
            for j in js
        ]


def _ids(table: pa.Table) -> list[RowId]:
    return list(
        zip(
            table.column("table").to_pylist(),
            table.column("file").to_pylist(),
            table.column("row").to_pylist(),
            strict=True,
        )
    )


def _with_groups(rows: pa.Table, assigned: dict[RowId, tuple[str, int]]) -> pa.Table:
    found = [assigned[rid] for rid in _ids(rows)]
    return rows.append_column("group", pa.array([g for g, _ in found], pa.string())).append_column(
        "rank", pa.array([r for _, r in found], pa.int32())
    )


def _matrix(table: pa.Table) -> np.ndarray:
    column = table.column("vector").combine_chunks()
    dim = column.type.list_size
    return column.values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), dim)


def _row_id(table: str, key: str) -> str:
    return f"{table}/{key}" if table else key


def _by_file(grouped: pa.Table) -> dict[str, pa.Table]:
    keys = pa.array(_keys_of(grouped), pa.string())
    return {key: grouped.filter(pc.equal(keys, key)) for key in set(keys.to_pylist())}


def _keys_of(table: pa.Table) -> list[str]:
    """Each row's file as state.json names it (``table/file``, or ``file`` at the root)."""
    return [
        _join_key(t, f)
        for t, f in zip(
            table.column("table").to_pylist(), table.column("file").to_pylist(), strict=True
        )
    ]


# -- writing --------------------------------------------------------------------------------


def _write(uri: str, table: pa.Table, storage: StorageOptions | None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    fs, path = get_fs(uri, storage)
    write_bytes_atomic(fs, path, buf.getvalue())


def _write_results(
    snap: Snapshot,
    file: TableFile,
    parts: list[pa.Table],
    settings: SemDedupSettings,
    judge: str,
    run_meta: dict[str, Any] | None,
    storage: StorageOptions | None,
    report: SemDedupReport,
) -> None:
    """One shard file's groups beside its table; rows without a vector get nulls."""
    from clipbatch.io.storage import read_parquet_columns

    keys = read_parquet_columns(snap.fs, file.path, ["key"])
    n = keys.num_rows if keys is not None else 0
    cluster = np.full(n, -1, np.int32)
    rank = np.full(n, -1, np.int32)
    group: list[str | None] = [None] * n
    for part in parts:
        rows = part.column("row").to_numpy()
        cluster[rows] = part.column("cluster").to_numpy()
        rank[rows] = part.column("rank").to_numpy()
        for r, g in zip(rows.tolist(), part.column("group").to_pylist(), strict=True):
            group[r] = g
    has = cluster >= 0
    report.rows_new += int(has.sum())
    report.duplicates_new += int((rank > 0).sum())
    out = pa.table(
        {
            "key": keys.column("key") if keys is not None else pa.array([], pa.string()),
            "file": pa.array([file.name] * n, pa.string()),
            "cluster": pa.array(cluster, mask=~has),
            "group": pa.array(group, pa.string()),
            "rank": pa.array(rank, mask=~has),
        },
        schema=RESULT_SCHEMA,
    )
    table_uri = f"{snap.root.rstrip('/')}/{file.table}" if file.table else snap.root
    shard = file.name[: -len(".parquet")]
    write_judgement(table_uri, settings.name, shard, out, {
        "judge": {"name": settings.name, "eps": settings.eps, "centroids": judge, "column": settings.column},
        "table_file": file.name,
        "table_file_version": file.version,
        "run": run_meta or {},
    }, storage)  # fmt: skip
    index = JudgementIndex.read(table_uri, settings.name, storage)
    index.entries[shard] = {"file_version": file.version, "judge": judge, "rows": n}
    index.write()


def _compact(
    home: str, state: _State, current: dict[str, str], settings: SemDedupSettings, name: str,
    storage: StorageOptions | None,
) -> None:  # fmt: skip
    """Merge every part into one, bucket by bucket; the old parts go once state.json no
    longer names them (the next run removes them as orphans)."""
    for b in range(settings.buckets):
        old = _old_rows(home, state, b, current, storage)
        if old is not None and old.num_rows:
            _write(join(home, "parts", name, f"bucket-{b:03d}.parquet"), old, storage)
    state.parts = [name]


def _remove_orphan_parts(home: str, state: _State, storage: StorageOptions | None) -> None:
    fs, path = get_fs(join(home, "parts"), storage)
    try:
        entries = with_retries(lambda: fs.ls(path, detail=False), f"list {path}")
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.rstrip("/").rsplit("/", 1)[-1] not in state.parts:
            remove_quietly(fs, entry, recursive=True)


def _read_state(home: str, storage: StorageOptions | None) -> _State | None:
    fs, path = get_fs(join(home, "state.json"), storage)
    try:
        data = json.loads(read_bytes(fs, path))
    except FileNotFoundError:
        return None
    return _State(
        centroids_sha256=data["centroids_sha256"],
        clusters=int(data["clusters"]),
        trained_on=int(data.get("trained_on", 0)),
        parts=list(data["parts"]),
        files=dict(data["files"]),
    )


def _write_state(
    home: str, state: _State, settings: SemDedupSettings, storage: StorageOptions | None
) -> None:
    body = {
        "version": 1,
        "settings": {"eps": settings.eps, "column": settings.column, "buckets": settings.buckets},
        **state.__dict__,
    }
    fs, path = get_fs(join(home, "state.json"), storage)
    write_bytes_atomic(fs, path, json.dumps(body, indent=1, sort_keys=True).encode())


def _file_key(file: TableFile) -> str:
    return _join_key(file.table, file.name)


def _join_key(table: str, name: str) -> str:
    return f"{table}/{name}" if table else name
