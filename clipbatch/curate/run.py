"""Curate a root: judgements -> decisions -> curated WebDataset shards, night after night.

One run of :func:`curate_root`:

1. **Check, before any work.** The spec is the one the selection was made with; every
   score its rules read exists beside every table, or the spec names a head to compute
   it, and that head accepts the tables' model. Anything else is a :class:`ConfigError`.
2. **Judge** what is new (incremental): the spec's heads, and SemDeDup when the rules
   keep one row per duplicate group (:mod:`clipbatch.judge`).
3. **Decide** the rows of every shard file the selection has not decided at its current
   version: keep, or drop with every reason (:mod:`clipbatch.curate.rules`). A file whose
   judgements are not current yet (scored by another job that has not run) waits for
   the next run. Rows of a file rewritten since (a retry) that were kept stay kept, with
   the shard that shipped them; only the others are decided again.
4. **Copy** the kept rows' images, byte for byte, from their sources (checked against
   ``image_sha256``: a mismatch is a recorded drop, never a silent copy) into new shards,
   staged beside the output.
5. **Commit** ``state.json`` (the selection's commit point), then **publish** the staged
   shards. A crash before the commit leaves the previous selection and no new shard
   visible; a crash after it is finished by the next run.

Stable: a row once kept and shipped stays kept; a new row that duplicates an earlier
row is dropped; shipped shards are never rewritten.

Example::

    from clipbatch.curate.run import curate_root

    report = curate_root("s3://bucket/emb", "curate.yaml")
    report.kept, report.reasons        # 81234, {'similarity': 5012, 'duplicate': 310}
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipbatch import __version__
from clipbatch.config import StorageOptions
from clipbatch.curate.rules import RowJudgements, evaluate, reason_kind
from clipbatch.curate.shards import (
    STAGING_DIR,
    BuiltShard,
    Sample,
    ShardBuilder,
    abort_abandoned,
    publish,
    remove_staging,
    sample_key,
    shard_name,
    stage,
)
from clipbatch.curate.spec import CurationSpec, load_spec
from clipbatch.curate.store import (
    SELECTION_SCHEMA,
    SelectionState,
    read_selection,
    selection_home,
    write_selection,
)
from clipbatch.errors import ConfigError
from clipbatch.faults import crash_point
from clipbatch.heads.base import Head
from clipbatch.io.storage import (
    get_fs,
    join,
    read_parquet_columns,
    read_parquet_metadata,
    remove_quietly,
)
from clipbatch.judge.store import JudgementIndex, judgements_of, read_judgement
from clipbatch.sink.schema import decode_metadata
from clipbatch.tables.row_images import RowImageError, RowImages, RowLocation
from clipbatch.tables.snapshot import Snapshot, TableFile, snapshot

log = logging.getLogger(__name__)

ROW_COLUMNS = [
    "key", "status", "similarity", "caption", "source_uri", "source_member",
    "source_version", "image_sha256", "width", "height",
]  # fmt: skip
COPY_BATCH = 1024  # rows whose images are read at once (memory: their bytes)
READ_AHEAD = 4  # batches read (at once) ahead of the one being written (memory: theirs)
STAGING = 2  # finished shards uploading or waiting to, on local disk, at most
PUBLISH_THREADS = 8  # shards published at once


@dataclass
class CurationReport:
    root: str
    name: str
    identity: str
    files_decided: int = 0
    files_current: int = 0
    files_waiting: list[str] = field(default_factory=list)
    rows_decided: int = 0
    kept: int = 0
    dropped: int = 0
    reasons: Counter[str] = field(default_factory=Counter)  # by kind: rows dropped for it
    shards: list[str] = field(default_factory=list)  # published by this run
    image_bytes: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # per stage

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "reasons": dict(self.reasons.most_common())}


def curate_root(
    root: str,
    spec: str | Path | dict[str, Any] | CurationSpec,
    storage: StorageOptions | None = None,
    run_meta: dict[str, Any] | None = None,
    workdir: str | None = None,
) -> CurationReport:
    """Bring the selection ``spec`` names up to date with ``root``, and ship its new rows.

    ``spec`` is a YAML path, a dict or a :class:`CurationSpec`; the run's steps are the
    module's (check, judge, decide, copy, commit, publish). Returns what it decided,
    kept, dropped (by reason) and shipped, with per-stage timings.

    Example::

        from clipbatch.curate.run import curate_root

        spec = {
            "name": "nightly",
            "rules": {"status_ok": True, "min_similarity": 0.28, "unique": 0.05},
            "output": {"url": "s3://bucket/curated/nightly/"},
        }
        report = curate_root("s3://bucket/emb", spec)
        report.shards                      # ['00000', '00001']: shipped this run
    """
    spec = load_spec(spec)
    storage = storage or StorageOptions()
    clock = _Clock()
    run = str((run_meta or {}).get("flow_run_id") or uuid.uuid4().hex)[:12]
    run = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{run}"
    snap = snapshot(root, storage)
    if not snap.files:
        raise ConfigError(f"{root}: no table to curate (no shard files under it)")
    state = SelectionState.read(root, spec.name, storage)
    if state is not None:
        state.check(spec.identity())
    heads = _check_judgements(snap, spec, storage)  # before any work
    report = CurationReport(root, spec.name, spec.identity())
    if state is not None and state.staged:
        _publish_staged(state, spec, storage, report)  # a crashed run's committed shards
    with clock("judge"):
        _judge(root, spec, heads, storage, run_meta)
    state = state or SelectionState(
        root,
        spec.name,
        spec.identity(),
        spec.model_dump(mode="json", exclude={"output": {"storage"}}),
    )
    _remove_abandoned_staging(spec, state)
    todo = [f for f in snap.files if not state.bound(f.key, f.version)]
    report.files_current = len(snap.files) - len(todo)
    with tempfile.TemporaryDirectory(prefix="clipbatch-curate-", dir=workdir) as tmp:
        copier = _Copier(spec, state, Path(tmp), run, run_meta or {}, storage, report, clock)
        decided: dict[str, dict[str, Any]] = {}
        indexes = _Indexes(snap, storage)

        def decide(file: TableFile) -> tuple[pa.Table, list[_Candidate], dict[str, str]] | None:
            return _decide(snap, file, spec, state, indexes, storage)

        # Decisions, and image reads, run a step ahead, each in a thread of its own, while
        # this one writes the shards (and threads of the copier's upload them).
        with (
            copier,
            _Ahead((decide(f) for f in todo), 1) as decisions,
            ThreadPoolExecutor(READ_AHEAD, thread_name_prefix="curate-read") as reads,
            _Ahead(_read_ahead(decisions, copier.images, reads), READ_AHEAD - 1) as ahead,
        ):
            for file in todo:
                with clock("decide"):
                    decision = next(ahead)
                if decision is None:
                    report.files_waiting.append(file.key)
                    continue
                rows, candidates, judges = decision
                kept_before = int(pc.sum(rows.column("keep")).as_py() or 0) - len(candidates)
                rows = copier.copy(file, rows, candidates, judges, ahead)
                entry = _write_file_selection(
                    root, spec, file, rows, judges, run, run_meta, storage, copier.later
                )
                entry["kept_before"] = kept_before
                decided[file.key] = entry
                report.files_decided += 1
                report.rows_decided += rows.num_rows
            copier.close()
    previous = {k: state.files.get(k, {}).get("selection") for k in decided}
    state.files.update(decided)
    state.staged.extend(copier.staged)
    state.next_shard = copier.next_shard
    state.runs.append({"run": run, "meta": run_meta or {}, "decided": len(decided),
                       "kept": report.kept, "dropped": report.dropped,
                       "shards": [s["name"] for s in copier.staged]})  # fmt: skip
    crash_point("curate_before_commit", spec.name)
    state.write(storage)  # the commit point
    crash_point("curate_before_publish", spec.name)
    with clock("publish"):
        _publish_staged(state, spec, storage, report)
    for key, old in previous.items():  # a rewritten file's superseded selection
        if old and old != decided[key]["selection"]:
            fs, path = get_fs(join(selection_home(root, spec.name), old), storage)
            remove_quietly(fs, path)
    report.seconds = clock.seconds()
    log.info(
        "selection %s of %s: %d file(s) decided, %d rows kept, %d dropped %s, %d shard(s) "
        "published (%.1f MB), %d file(s) waiting for judgements",
        spec.name, root, report.files_decided, report.kept, report.dropped,
        dict(report.reasons), len(report.shards), report.image_bytes / 1e6,
        len(report.files_waiting),
    )  # fmt: skip
    return report


# -- 1. checks ---------------------------------------------------------------------------------


def _check_judgements(snap: Snapshot, spec: CurationSpec, storage: StorageOptions) -> list[Head]:
    """The heads to run; a clear error when a score is neither beside a table nor computable."""
    from clipbatch.heads.registry import load_head

    heads: list[Head] = []
    for name, ref in sorted(spec.heads.items()):
        head = load_head(ref)
        if head.name != name:
            raise ConfigError(
                f"spec {spec.name!r}: heads.{name} is {ref!r}, whose scores are named "
                f"{head.name!r}; name it heads.{head.name}"
            )
        heads.append(head)
    computed = {h.name for h in heads}
    for table in snap.tables:
        uri = _table_uri(snap, table)
        have = set(judgements_of(uri, storage))
        missing = sorted(set(spec.rules.scores) - have - computed)
        if missing:
            raise ConfigError(
                f"spec {spec.name!r} reads the score(s) {', '.join(missing)}, which "
                f"{uri} does not have (it has: {', '.join(sorted(have)) or 'none'}); score "
                "them first (`clipbatch score ROOT --head …`) or name their heads under heads:"
            )
        if heads:
            first = next(f for f in snap.files if f.table == table)
            meta = decode_metadata(read_parquet_metadata(snap.fs, first.path).metadata) or {}
            for head in heads:
                head.check_table(meta.get("model") or {})
    return heads


def _judge(
    root: str,
    spec: CurationSpec,
    heads: list[Head],
    storage: StorageOptions,
    run_meta: dict[str, Any] | None,
) -> None:
    from clipbatch.judge.score import score_root
    from clipbatch.judge.semdedup import SemDedupSettings, semdedup_root

    if heads:
        score_root(root, heads, storage, run_meta)
    if spec.rules.unique is not None:
        semdedup_root(root, SemDedupSettings(eps=spec.rules.unique), storage, run_meta)


# -- 3. decisions ------------------------------------------------------------------------------


class _Indexes:
    """Each table's judgement indexes, read once per run."""

    def __init__(self, snap: Snapshot, storage: StorageOptions) -> None:
        self.snap, self.storage = snap, storage
        self.cache: dict[tuple[str, str], JudgementIndex] = {}

    def get(self, table: str, name: str) -> JudgementIndex:
        if (table, name) not in self.cache:
            uri = _table_uri(self.snap, table)
            self.cache[(table, name)] = JudgementIndex.read(uri, name, self.storage)
        return self.cache[(table, name)]


@dataclass
class _Candidate:
    index: int  # the row in the file
    location: RowLocation
    meta: dict[str, Any]
    row: dict[str, Any]


def _decide(
    snap: Snapshot,
    file: TableFile,
    spec: CurationSpec,
    state: SelectionState,
    indexes: _Indexes,
    storage: StorageOptions,
) -> tuple[pa.Table, list[_Candidate], dict[str, str]] | None:
    """One file's rows decided (selection rows) and its rows to copy; None: waiting."""
    shard = file.name[: -len(".parquet")]
    uri = _table_uri(snap, file.table)
    judges: dict[str, str] = {}
    aligned: dict[str, pa.Table] = {}
    for name in spec.judgements():
        entry = indexes.get(file.table, name).entries.get(shard) or {}
        if entry.get("file_version") != file.version:
            return None  # not judged at this version yet
        data = read_judgement(uri, name, shard, storage)
        if data is None:
            return None
        judges[name] = str(entry.get("judge"))
        aligned[name] = data
    data = read_parquet_columns(snap.fs, file.path, ROW_COLUMNS)
    if data is None:
        raise ConfigError(f"{file.path}: not a clipbatch table file (columns missing)")
    meta = decode_metadata(data.schema.metadata) or {}
    keys = data.column("key").to_pylist()
    where = {k: i for i, k in enumerate(keys)}
    n = data.num_rows
    scores = {}
    for name in spec.rules.scores:
        values = np.full(n, np.nan, np.float32)
        j = aligned[name]
        rows, found = _rows_of(j, where)
        got = pc.fill_null(j.column("score").cast(pa.float32()), float("nan"))
        values[rows] = got.to_numpy(zero_copy_only=False)[found]
        scores[name] = values
    group = rank = None
    if spec.rules.grouping:
        j = aligned[spec.rules.grouping]
        rows, found = _rows_of(j, where)
        group = np.full(n, None, object)
        rank = np.full(n, -1, np.int32)
        group[rows] = np.asarray(j.column("group").to_pylist(), object)[found]
        rank[rows] = pc.fill_null(j.column("rank"), -1).to_numpy(zero_copy_only=False)[found]
    similarity = pc.fill_null(data.column("similarity").cast(pa.float32()), float("nan"))
    judged = RowJudgements(
        status=np.asarray(data.column("status").to_pylist(), object),
        similarity=similarity.to_numpy(zero_copy_only=False).astype(np.float32),
        scores=scores,
        group=group,
        rank=rank,
    )
    keep, reasons = evaluate(spec.rules, judged)
    shards: list[str | None] = [None] * n
    samples: list[str | None] = [None] * n
    previous = state.files.get(file.key)
    if previous:  # a rewritten file: rows kept (and shipped) before stay kept
        old = read_selection(join(selection_home(snap.root, spec.name), previous["selection"]),
                             storage)  # fmt: skip
        if old is not None:
            for r in old.filter(old.column("keep")).to_pylist():
                i = where.get(r["key"])
                if i is not None:
                    keep[i], reasons[i] = True, []
                    shards[i], samples[i] = r["shard"], r["sample_key"]
    source = meta.get("source") or {}
    options = (meta.get("options") or {}).get("source_options") or {}
    dest = _table_uri(snap, file.table)
    candidates = []
    columns = {c: data.column(c).to_pylist() for c in ROW_COLUMNS}
    for i in np.flatnonzero(keep):
        if shards[i] is not None:
            continue
        sha = columns["image_sha256"][i]
        location = RowLocation(
            key=keys[i], kind=str(source.get("kind") or ""), dest=dest, shard=shard,
            source_uri=columns["source_uri"][i], source_member=columns["source_member"][i],
            image_sha256=sha, source_options=options,
        )  # fmt: skip
        row_scores = {name: _num(scores[name][i]) for name in scores}
        lineage = {
            "table": file.table, "key": keys[i], "file": file.name,
            "file_version": file.version, "uri": columns["source_uri"][i],
            "member": columns["source_member"][i], "version": columns["source_version"][i],
        }  # fmt: skip
        info = {
            "caption": columns["caption"][i],
            "url": columns["source_uri"][i],
            "width": columns["width"][i],
            "height": columns["height"][i],
            "sha256": sha.hex() if sha else None,
            "similarity": _num(judged.similarity[i]),
        }
        sample_meta = {**info, "status": "success", "scores": row_scores, "source": lineage,
                       "duplicate_group": None if group is None else group[i]}  # fmt: skip
        candidates.append(_Candidate(int(i), location, sample_meta, {
            **info, "status": "success", "error_message": None,
            **{f"source_{k}": v for k, v in lineage.items()}, "scores": row_scores,
        }))  # fmt: skip
    rows = pa.table(
        {
            "key": keys,
            "file": [file.name] * n,
            "file_version": [file.version] * n,
            "source_uri": columns["source_uri"],
            "source_member": columns["source_member"],
            "source_version": columns["source_version"],
            "image_sha256": columns["image_sha256"],
            "keep": keep.tolist(),
            "reasons": reasons,
            "shard": shards,
            "sample_key": samples,
        },
        schema=SELECTION_SCHEMA,
    )
    return rows, candidates, judges


def _rows_of(judgement: pa.Table, where: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    rows = np.array([where.get(k, -1) for k in judgement.column("key").to_pylist()], np.int64)
    found = rows >= 0
    return rows[found], found


def _num(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), 6)


# -- 4. copies ---------------------------------------------------------------------------------


def _read_ahead(
    decisions: Iterator[tuple[pa.Table, list[_Candidate], dict[str, str]] | None],
    images: RowImages,
    reads: ThreadPoolExecutor,
) -> Iterator[Any]:
    """Per file, its decision (None: waiting), then its candidates' images, a batch at a
    time (:data:`COPY_BATCH` rows), each a future of ``reads``: what :class:`_Ahead` runs
    ahead of the writing, so that the batches it holds are read at once (reads of
    several source files overlap, as a plain copy's do)."""
    for decision in decisions:
        yield decision
        if decision is None:
            continue
        candidates = decision[1]
        for start in range(0, len(candidates), COPY_BATCH):
            batch = candidates[start : start + COPY_BATCH]
            yield reads.submit(images.read_many, [c.location for c in batch])


class _Ahead:
    """An iterator run in a thread of its own, at most ``ahead`` items ahead of its
    reader (memory: that many items); its errors are raised to the reader, in order.
    Leaving the ``with`` stops it."""

    _END = object()

    def __init__(self, items: Iterator[Any], ahead: int) -> None:
        self._items = items
        self._queue: queue.Queue[tuple[bool, Any]] = queue.Queue(ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="curate-ahead", daemon=True)

    def __enter__(self) -> _Ahead:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # unblock a put
                self._queue.get(timeout=0.05)
        self._thread.join()

    def __iter__(self) -> _Ahead:
        return self

    def __next__(self) -> Any:
        ok, item = self._queue.get()
        if not ok:
            raise item
        if item is self._END:
            raise StopIteration
        return item

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._put((True, item)):
                    return
            self._put((True, self._END))
        except BaseException as e:  # raised to the reader
            self._put((False, e))

    def _put(self, entry: tuple[bool, Any]) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False


class _Copier:
    """Kept rows' images into shards: read in batches (ahead, by :class:`_Ahead`),
    checked, written, and staged by a thread of its own while the next shard is written."""

    def __init__(
        self,
        spec: CurationSpec,
        state: SelectionState,
        workdir: Path,
        run: str,
        run_meta: dict[str, Any],
        storage: StorageOptions,
        report: CurationReport,
        clock: _Clock,
    ) -> None:
        self.spec, self.workdir, self.run, self.run_meta = spec, workdir, run, run_meta
        self.report, self.clock = report, clock
        self.images = RowImages(storage)
        self.next_shard = state.next_shard
        self.builder: ShardBuilder | None = None
        self.sources: dict[str, dict[str, Any]] = {}  # the table files in the open shard
        self.judges: dict[str, str] = {}
        self.staged: list[dict[str, Any]] = []
        self.schema: pa.Schema | None = None
        self.uploads = ThreadPoolExecutor(1, thread_name_prefix="curate-stage")
        self.pending: deque[Future[None]] = deque()  # shards uploading, in order
        self.writes = ThreadPoolExecutor(2, thread_name_prefix="curate-write")
        self.written: list[Future[Any]] = []  # selection files

    def __enter__(self) -> _Copier:
        return self

    def __exit__(self, *exc: object) -> None:
        # After an error: no upload left running over a work dir about to be removed.
        self.uploads.shutdown(wait=True, cancel_futures=True)
        self.writes.shutdown(wait=True, cancel_futures=True)

    def later(self, write: Callable[[], Any]) -> None:
        """``write`` in a thread of the copier's; :meth:`close` waits for it (before the
        commit), and raises its error."""
        self.written.append(self.writes.submit(write))

    def copy(
        self,
        file: TableFile,
        rows: pa.Table,
        candidates: list[_Candidate],
        judges: dict[str, str],
        images: Iterator[Future[list[bytes | RowImageError]]],
    ) -> pa.Table:
        """Copy ``candidates``, whose images ``images`` yields a batch at a time (in order,
        :data:`COPY_BATCH` rows each); returns ``rows`` with their shards, or their drop
        reasons."""
        keep = rows.column("keep").to_pylist()
        reasons = rows.column("reasons").to_pylist()
        shards = rows.column("shard").to_pylist()
        samples = rows.column("sample_key").to_pylist()
        rows_per_shard = self.spec.output.rows_per_shard
        for start in range(0, len(candidates), COPY_BATCH):
            batch = candidates[start : start + COPY_BATCH]
            with self.clock("read"):
                got = next(images).result()
            for c, data in zip(batch, got, strict=True):
                if isinstance(data, RowImageError):
                    keep[c.index], reasons[c.index] = False, [f"image: {data}"]
                    continue
                with self.clock("write"):
                    builder = self._builder()
                    key = sample_key(builder.number, len(builder.rows), rows_per_shard)
                    builder.add(Sample(key, data, c.meta.get("caption"), {"key": key, **c.meta},
                                       {"key": key, **c.row}))  # fmt: skip
                self.sources[file.key] = {"table": file.table, "file": file.name,
                                          "version": file.version}  # fmt: skip
                self.judges.update(judges)
                shards[c.index], samples[c.index] = shard_name(builder.number), key
                self.report.image_bytes += len(data)
                if builder.full:
                    self._finish()
        for i in range(len(keep)):
            if keep[i]:
                self.report.kept += 1
            else:
                self.report.dropped += 1
                for kind in {reason_kind(r) for r in reasons[i]}:
                    self.report.reasons[kind] += 1
        return (
            rows.set_column(rows.schema.get_field_index("keep"), "keep", pa.array(keep))
            .set_column(rows.schema.get_field_index("reasons"), "reasons",
                        pa.array(reasons, pa.list_(pa.string())))
            .set_column(rows.schema.get_field_index("shard"), "shard", pa.array(shards, pa.string()))
            .set_column(rows.schema.get_field_index("sample_key"), "sample_key",
                        pa.array(samples, pa.string()))
        )  # fmt: skip

    def close(self) -> None:
        """The open shard finished, and every shard staged (an upload's error raised)."""
        if self.builder is not None and self.builder.rows:
            self._finish()
        with self.clock("stage"):
            while self.pending:
                self.pending.popleft().result()
        for future in self.written:
            future.result()

    def _builder(self) -> ShardBuilder:
        if self.builder is None:
            self.builder = ShardBuilder(
                self.next_shard, self.workdir, self.spec.output.rows_per_shard
            )
            self.next_shard += 1
        return self.builder

    def _finish(self) -> None:
        assert self.builder is not None
        builder, self.builder = self.builder, None
        stats = {
            "spec": {"name": self.spec.name, "identity": self.spec.identity(),
                     "rules": self.spec.rules.model_dump(mode="json")},
            "table": {"root": self.report.root, "files": list(self.sources.values())},
            "judgements": dict(sorted(self.judges.items())),
            "run": {"run": self.run, **self.run_meta},
            "clipbatch": __version__,
        }  # fmt: skip
        self.sources, self.judges = {}, {}
        with self.clock("write"):
            built: BuiltShard = builder.finish(stats, _sample_schema(builder.rows))
        with self.clock("stage"):  # at most STAGING shards on local disk, waiting
            while len(self.pending) >= STAGING or (self.pending and self.pending[0].done()):
                self.pending.popleft().result()
        entry = {"name": built.name, "number": built.number, "run": self.run,
                 "rows": built.rows, "image_bytes": built.image_bytes}  # fmt: skip
        self.pending.append(self.uploads.submit(self._stage, built, entry))
        self.staged.append(entry)

    def _stage(self, built: BuiltShard, entry: dict[str, Any]) -> None:
        uploads = stage(built, self.spec.output.url, self.run, self.spec.output.storage)
        if uploads:  # S3: what completing the shard's uploads needs, for the commit
            entry["uploads"] = uploads
        crash_point("curate_mid_write", built.name)


def _sample_schema(rows: list[dict[str, Any]]) -> pa.Schema:
    names = sorted({n for r in rows for n in (r.get("scores") or {})})
    fields = [
        ("key", pa.string()), ("caption", pa.string()), ("url", pa.string()),
        ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
        ("height", pa.int32()), ("sha256", pa.string()), ("similarity", pa.float64()),
        ("source_table", pa.string()), ("source_key", pa.string()), ("source_file", pa.string()),
        ("source_file_version", pa.string()), ("source_uri", pa.string()),
        ("source_member", pa.string()), ("source_version", pa.string()),
    ]  # fmt: skip
    if names:  # Parquet has no empty struct
        fields.append(("scores", pa.struct([pa.field(n, pa.float64()) for n in names])))
    return pa.schema([pa.field(n, t) for n, t in fields])


# -- 5. commit and publish ---------------------------------------------------------------------


def _write_file_selection(
    root: str,
    spec: CurationSpec,
    file: TableFile,
    rows: pa.Table,
    judges: dict[str, str],
    run: str,
    run_meta: dict[str, Any] | None,
    storage: StorageOptions,
    submit: Callable[[Callable[[], Any]], Any] = lambda write: write(),
) -> dict[str, Any]:
    """The file's selection, under a name bound to its version (a committed selection of an
    earlier version stays readable until the commit replaces it); written by ``submit``
    (now, or by a thread to be waited for before the commit)."""
    tag = hashlib.sha256((file.version or "").encode()).hexdigest()[:10]
    shard = file.name[: -len(".parquet")]
    parts = ["selection", *([file.table] if file.table else []), f"{shard}.{tag}.parquet"]
    relative = "/".join(parts)
    metadata = {
        "spec": {"name": spec.name, "identity": spec.identity()},
        "table_file": file.name, "table_file_version": file.version,
        "judgements": judges, "run": {"run": run, **(run_meta or {})},
    }  # fmt: skip
    uri = join(selection_home(root, spec.name), *parts)
    submit(lambda: write_selection(uri, rows, metadata, storage))
    kept = int(pc.sum(rows.column("keep")).as_py() or 0)
    return {"version": file.version, "selection": relative, "kept": kept,
            "dropped": rows.num_rows - kept}  # fmt: skip


def _publish_staged(
    state: SelectionState, spec: CurationSpec, storage: StorageOptions, report: CurationReport
) -> None:
    runs = set()
    entries = list(state.staged)

    # Shards are published independently of one another (each its .tar last): at once.
    def one(entry: dict[str, Any]) -> None:
        publish(
            entry["number"], spec.output.url, entry["run"], spec.output.storage,
            entry.get("uploads"),
        )  # fmt: skip

    with ThreadPoolExecutor(PUBLISH_THREADS, thread_name_prefix="curate-publish") as pool:
        list(pool.map(one, entries))
    for entry in entries:
        state.shards.append(entry)
        report.shards.append(entry["name"])
        if not entry.get("uploads"):  # staged as copies, under _staging/{run}/
            runs.add(entry["run"])
    state.staged = []
    state.write(storage)
    for run in runs:
        remove_staging(spec.output.url, run, spec.output.storage)


def _remove_abandoned_staging(spec: CurationSpec, state: SelectionState) -> None:
    """Staged shards of a run that crashed before its commit: never published, removed
    (uploads not completed aborted, copies under ``_staging/`` deleted)."""
    committed = {u["upload_id"] for e in state.staged for u in (e.get("uploads") or {}).values()}
    aborted = abort_abandoned(spec.output.url, spec.output.storage, committed)
    if aborted:
        log.info("aborted %d upload(s) of shards a crashed run never committed", aborted)
    fs, path = get_fs(join(spec.output.url, STAGING_DIR), spec.output.storage)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return
    keep = {e["run"] for e in state.staged}
    for entry in entries:
        if entry.rstrip("/").rsplit("/", 1)[-1] not in keep:
            remove_quietly(fs, entry, recursive=True)


def _table_uri(snap: Snapshot, table: str) -> str:
    return f"{snap.root.rstrip('/')}/{table}" if table else snap.root


class _Clock:
    """Seconds per stage (judge, decide, read, write, stage, publish)."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()

    def __call__(self, stage: str) -> Any:
        import contextlib

        @contextlib.contextmanager
        def timed() -> Any:
            start = time.perf_counter()
            try:
                yield
            finally:
                self.totals[stage] += time.perf_counter() - start

        return timed()

    def seconds(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.totals.items()}
