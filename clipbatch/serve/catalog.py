"""Every row of a root, without its vectors, held once: what a query's hits are shown with.

Read at start-up, one file at a time, only the columns a page shows (key, caption,
status, error, similarity, source, image hash, size), so a hit's key and caption never
cost a read per query. About 100 bytes a row: a million rows hold about 100 MB.
Brute-force search also keeps the image vectors (``with_vectors``), as float16.

The rows' judgements come along (:mod:`clipbatch.judge`): each head's score
(``_scores/{head}/``) and each SemDeDup's group and rank (``_scores/semdedup-{eps}/``),
read once per shard file, and only where the judgement is bound to the file version the
catalog holds (a file rewritten since it was judged shows no judgement, not a stale one).
Searches filter on them: ``aesthetic-laion-v2>=5``, ``nsfw-laion-l14<=0.2``, and the
first row of each duplicate group.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipbatch.config import StorageOptions
from clipbatch.curate.store import SelectionState, list_selections, read_selection
from clipbatch.errors import ClipbatchError
from clipbatch.judge.store import JudgementIndex, judgements_of, read_judgement
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


class UnknownJudgement(ClipbatchError):
    """A filter names a score or duplicate grouping this root does not have."""


SCORE_FILTER = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*(>=|<=)\s*(-?[0-9.]+(?:[eE]-?[0-9]+)?)\s*$")


def parse_score_filter(text: str) -> tuple[str, str, float]:
    """``"aesthetic-laion-v2>=5"`` -> ``("aesthetic-laion-v2", ">=", 5.0)``."""
    match = SCORE_FILTER.match(text)
    if not match:
        raise ValueError(f"score filter {text!r}: write NAME>=VALUE or NAME<=VALUE")
    return match.group(1), match.group(2), float(match.group(3))


@dataclass
class Selection:
    """One curation selection over the catalog: keep (1), drop (0) or undecided (-1)."""

    keep: np.ndarray  # int8
    reasons: np.ndarray  # object: list of reasons, or None
    shard: np.ndarray  # object: the curated shard of a kept row


@dataclass
class Groups:
    """One SemDeDup judgement over the catalog: each row's group and rank (-1: none)."""

    group: np.ndarray  # object: the group's first row, "table/key", or None
    rank: np.ndarray  # int32


@dataclass(frozen=True)
class FileInfo:
    table: str  # the partition table, relative to the root ("" for the root itself)
    dest: str
    name: str  # e.g. 00000.parquet
    start: int  # its first row in the catalog
    rows: int
    metadata: dict[str, Any]
    version: str | None = None  # as listed: what judgements are bound to

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
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # head -> float32, NaN: none
    groups: dict[str, Groups] = field(default_factory=dict)  # semdedup-{eps} -> groups
    # curation spec name -> each row's decision (None: not decided) and drop reasons
    selections: dict[str, Selection] = field(default_factory=dict)

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
            "scores": self.scores_of(i),
            "duplicates": {
                name: {"group": g.group[i], "rank": int(g.rank[i])}
                for name, g in self.groups.items()
                if g.rank[i] >= 0
            },
            "curation": {
                name: {
                    "keep": bool(sel.keep[i]),
                    "reasons": list(sel.reasons[i] or []),
                    "shard": sel.shard[i],
                }
                for name, sel in self.selections.items()
                if sel.keep[i] >= 0
            },
        }

    def scores_of(self, i: int) -> dict[str, float | None]:
        """Row ``i``'s score from each head (None: not scored, or no vector)."""
        return {
            name: None if np.isnan(v[i]) else round(float(v[i]), 4)
            for name, v in self.scores.items()
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
        score_filters: list[str] | None = None,
        unique: str | None = None,
    ) -> np.ndarray | None:
        """Rows that pass the filters (None: no filter).

        ``score_filters``: ``NAME>=VALUE`` / ``NAME<=VALUE`` on a head's score (rows
        without that score fail them); ``unique``: a SemDeDup judgement's name, keeping
        each duplicate group's first row and the rows in no group.
        """
        similarity = min_similarity is not None or max_similarity is not None
        if not (statuses or tables or similarity or score_filters or unique):
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
            for text in score_filters or []:
                name, op, value = parse_score_filter(text)
                if name not in self.scores:
                    raise UnknownJudgement(
                        f"no score {name!r} under this root (scores: "
                        f"{', '.join(self.scores) or 'none'}; `clipbatch score` writes them)"
                    )
                values = self.scores[name]
                keep &= values >= value if op == ">=" else values <= value
        if unique:
            if unique not in self.groups:
                raise UnknownJudgement(
                    f"no duplicate groups {unique!r} under this root (have: "
                    f"{', '.join(self.groups) or 'none'}; `clipbatch score --semdedup` writes them)"
                )
            keep &= self.groups[unique].rank <= 0
        return keep

    def judgements(self) -> dict[str, Any]:
        """What the rows have been judged by: scores with their range, groupings."""
        scores = {}
        for name, values in self.scores.items():
            has = values[~np.isnan(values)]
            scores[name] = {
                "rows": int(len(has)),
                "min": round(float(has.min()), 4) if len(has) else None,
                "max": round(float(has.max()), 4) if len(has) else None,
                "mean": round(float(has.mean()), 4) if len(has) else None,
            }
        groups = {
            name: {
                "rows": int((g.rank >= 0).sum()),
                "duplicates": int((g.rank > 0).sum()),
            }
            for name, g in self.groups.items()
        }
        selections = {
            name: {"kept": int((sel.keep == 1).sum()), "dropped": int((sel.keep == 0).sum())}
            for name, sel in self.selections.items()
        }
        return {"scores": scores, "duplicates": groups, "curation": selections}

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
    _load_judgements(catalog, tables, storage)
    _load_selections(catalog, storage)
    if with_vectors:
        dim = int(model["embed_dim"])
        catalog.vectors = np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float16)
        catalog.has_vector = np.concatenate(valid) if valid else np.zeros(0, bool)
    log.info("catalog of %s: %d rows in %d file(s)", root, len(catalog), len(files))
    return catalog


def _info(table_name: str, table: OutputTable, file: ShardFile, start: int, rows: int) -> FileInfo:
    return FileInfo(
        table_name, table.dest, file.name, start, rows, file.metadata or {}, file.version
    )


def _load_judgements(
    catalog: RowCatalog, tables: list[OutputTable], storage: StorageOptions | None
) -> None:
    """Each table's judgements, one file per shard file, aligned to the catalog by key."""
    n = len(catalog)
    by_table: dict[str, list[FileInfo]] = {}
    for info in catalog.files:
        by_table.setdefault(info.table, []).append(info)
    for table, name in zip(tables, catalog.tables, strict=True):
        for judgement in judgements_of(table.dest, storage):
            index = JudgementIndex.read(table.dest, judgement, storage)
            for info in by_table.get(name, []):
                entry = index.entries.get(info.shard) or {}
                if info.version is None or entry.get("file_version") != info.version:
                    continue  # not judged yet, or judged before the file was rewritten
                data = read_judgement(table.dest, judgement, info.shard, storage)
                if data is None or data.num_rows == 0:
                    continue
                keys = catalog.rows.column("key").slice(info.start, info.rows).to_pylist()
                where = {k: info.start + j for j, k in enumerate(keys)}
                rows = np.array([where.get(k, -1) for k in data.column("key").to_pylist()])
                found = rows >= 0
                rows = rows[found]
                if "score" in data.column_names:
                    values = catalog.scores.setdefault(judgement, np.full(n, np.nan, np.float32))
                    score = pc.fill_null(data.column("score").cast(pa.float32()), float("nan"))
                    values[rows] = score.to_numpy(zero_copy_only=False)[found]
                elif "rank" in data.column_names:
                    groups = catalog.groups.setdefault(
                        judgement, Groups(np.full(n, None, object), np.full(n, -1, np.int32))
                    )
                    rank = pc.fill_null(data.column("rank"), -1).to_numpy(zero_copy_only=False)
                    group = np.asarray(data.column("group").to_pylist(), dtype=object)
                    groups.group[rows] = group[found]
                    groups.rank[rows] = rank[found]


def _one_model(tables: list[OutputTable]) -> dict[str, Any]:
    models = {(m["name"], m["checkpoint_sha256"]) for m in (t.model_metadata() for t in tables)}
    if len(models) > 1:
        raise ClipbatchError(
            f"the tables under this root were written by different models {sorted(models)}; "
            "serve one model's tables at a time"
        )
    return tables[0].model_metadata()


def _load_selections(catalog: RowCatalog, storage: StorageOptions | None) -> None:
    """The root's curation selections: each file's decisions, where the selection's
    ``state.json`` binds them to the file version the catalog holds."""
    n = len(catalog)
    for name in list_selections(catalog.root, storage):
        state = SelectionState.read(catalog.root, name, storage)
        if state is None:
            continue
        sel = Selection(np.full(n, -1, np.int8), np.full(n, None, object), np.full(n, None, object))
        for info in catalog.files:
            file_key = f"{info.table}/{info.name}" if info.table else info.name
            if not state.bound(file_key, info.version):
                continue
            uri = f"{catalog.root.rstrip('/')}/_curate/{name}/{state.files[file_key]['selection']}"
            data = read_selection(uri, storage)
            if data is None:
                continue
            keys = catalog.rows.column("key").slice(info.start, info.rows).to_pylist()
            where = {k: info.start + j for j, k in enumerate(keys)}
            for r in data.select(["key", "keep", "reasons", "shard"]).to_pylist():
                i = where.get(r["key"])
                if i is not None:
                    sel.keep[i] = 1 if r["keep"] else 0
                    sel.reasons[i] = r["reasons"]
                    sel.shard[i] = r["shard"]
        catalog.selections[name] = sel
