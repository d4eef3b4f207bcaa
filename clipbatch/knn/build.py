"""Build a kNN index of a table's vectors, and keep it current as partitions arrive.

FAISS directly, not autofaiss: autofaiss reads whole files (every column), fails on a
single null vector ("Expected all lists to be of size=64"), and numbers vectors by file
order without recording which row each is. Here only the key and the vector column are
read, one file at a time (:mod:`.vectors`); rows without a vector (a failed image) are
skipped; every id maps to its table, file, row and key (``ids.parquet``, :mod:`.commit`).

A build records the snapshot it was built from: every shard file's table, name, version
and fingerprint. The next build compares it with the tables now and updates the index
(:mod:`.update`), or rebuilds it from scratch by the policy in :mod:`.policy`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from clipbatch.config import StorageOptions
from clipbatch.errors import ConfigError
from clipbatch.knn.commit import BuildReport, Ids, build_info, commit_index
from clipbatch.knn.names import INDEX_COLUMNS
from clipbatch.knn.policy import (
    MAX_TRAIN,
    TRAIN_PER_LIST,
    IndexSettings,
    auto_factory,
    faiss_module,
    ivf_lists,
    rebuild_reasons,
    with_ids,
)
from clipbatch.knn.store import StoredBuild, read_current
from clipbatch.knn.update import update_index
from clipbatch.knn.vectors import FileVectors, ModelChangedError, OneModel, iter_vectors
from clipbatch.tables.snapshot import Snapshot, snapshot

log = logging.getLogger(__name__)


class NoVectorsError(ConfigError):
    """No row under the root has the vector an index is asked for."""


def build_index(
    root: str,
    name: str = "image",
    settings: IndexSettings | None = None,
    storage: StorageOptions | None = None,
    run_meta: dict[str, Any] | None = None,
) -> BuildReport:
    """Build (or update) the index ``name`` ("image" or "text") of the tables under ``root``.

    Example::

        from clipbatch.knn.build import build_index
        from clipbatch.knn.policy import IndexSettings

        report = build_index("emb/", "image", IndexSettings(factory="IVF1024,Flat"))
    """
    faiss = faiss_module()
    settings = settings or IndexSettings()
    if name not in INDEX_COLUMNS:
        raise ConfigError(f"index name {name!r}: one of {', '.join(INDEX_COLUMNS)}")
    column = INDEX_COLUMNS[name]
    start = time.perf_counter()
    snap = snapshot(root, storage)
    current = read_current(root, name, storage)
    reasons = [] if current is None else rebuild_reasons(current, snap, settings)
    report = None
    if current is not None and not reasons:
        old = {f["key"]: f for f in current.info["files"]}
        now = snap.by_key()
        gone = [k for k, f in old.items() if k not in now or now[k].version != f["version"]]
        new = [f for k, f in now.items() if k not in old or old[k]["version"] != f.version]
        if not gone and not new:
            return BuildReport(name, root, "current", current.info["vectors"], files=len(now))
        try:
            report = update_index(
                faiss, current, snap, column, gone, new, settings, storage, run_meta
            )
        except ModelChangedError:
            reasons = ["the table's model changed"]
    if report is None:
        report = build_from_scratch(faiss, snap, name, column, settings, storage, run_meta, current)
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
    """Build or update the named indexes (default: image and text).

    Example::

        from clipbatch.knn.build import build_indexes

        for report in build_indexes("s3://bucket/emb/vit-b-32"):
            print(report.name, report.mode, report.vectors)  # image built 1000000
    """
    return [
        build_or_skip(root, name, names is not None, settings, storage, run_meta)
        for name in names or list(INDEX_COLUMNS)
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


def build_from_scratch(
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
    unless every vector fit in ``settings.hold_bytes`` during the first (then one pass)."""
    counts: dict[str, int] = {}
    sample: list[np.ndarray] = []
    sampled = 0
    stride = 1  # every stride-th vector of each file is sampled: uniform over the table
    held: list[FileVectors] | None = []
    held_bytes = 0
    model = OneModel(snap.root)
    for fv in iter_vectors(snap, snap.files, column):
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
            if held_bytes <= settings.hold_bytes:
                held.append(fv)
            else:
                held = None
    total = sum(counts.values())
    if total == 0:
        raise NoVectorsError(f"{snap.root}: no row has a {column} vector to index")
    factory = auto_factory(total) if settings.factory == "auto" else settings.factory
    dim = int(sample[0].shape[1])
    index = faiss.index_factory(dim, with_ids(factory), faiss.METRIC_INNER_PRODUCT)
    train = np.concatenate(sample)
    del sample
    if not index.is_trained:
        want = min(MAX_TRAIN, max(TRAIN_PER_LIST * ivf_lists(factory), 10_000))
        if len(train) > want:
            train = train[np.random.default_rng(0).choice(len(train), want, replace=False)]
        index.train(train)
    trained_on = total
    del train
    ids = Ids()
    for fv in held if held is not None else iter_vectors(snap, snap.files, column):
        if len(fv.rows):
            index.add_with_ids(fv.vectors, ids.assign(fv))
    del held
    info = build_info(
        snap, name, column, model.model or {}, factory, settings, index, counts, trained_on,
        run_meta, ids.next,
    )  # fmt: skip
    info["parent"] = parent.version if parent else None
    build = commit_index(faiss, snap, name, index, ids, info, storage)
    return BuildReport(
        name, snap.root, "built", int(index.ntotal), added=int(index.ntotal),
        files=len(snap.files), factory=factory, version=build.version,
    )  # fmt: skip
