"""``clipbatch inspect``: every shard checked against its metadata, the commit index,
and the table contracts (docs/design.md §3)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from clipbatch.records import VECTOR_KEEP_RULES
from clipbatch.sink.commits.index import all_records
from clipbatch.sink.commits.segments import COMMITS_DIR, CommitRecord
from clipbatch.tables.table import OutputTable, ShardFile
from clipbatch.tables.vectors import embedding_matrix, normalize_rows
from clipbatch.upgrade.manifest_v1 import LEGACY_MANIFEST

log = logging.getLogger(__name__)

# fp16 storage rounds each component; a unit vector stored in fp16 has a norm within
# about 1e-3 of 1. Anything further off was not normalised, or was corrupted.
NORM_TOLERANCE = 1e-2
SIMILARITY_TOLERANCE = 1e-2


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
    """Check every shard against its own metadata, the commit index, and the table contracts.

    Example::

        from clipbatch.query.validate import validate

        report = validate("s3://bucket/emb/vit-b-32/date=2026-12-03")
        report.rows, dict(report.status_counts), report.problems[:3]  # no problems: consistent
    """
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
