"""Score every row of a root with heads: incremental, from the embeddings alone.

For each table under the root (a table, or the nightly ``date=…/`` tables of a partition
root) and each head: the head first checks the table's model (a head trained on ViT-L/14
vectors refuses a ViT-B/32 table, with a clear error), then every shard file whose
judgement is missing or bound to another file version or head is read (the key and the
one vector column it needs, nothing else), scored, and written beside the table
(:mod:`clipbatch.judge.store`). Rows without that vector get a null score. No image is
decoded again.

Example::

    from clipbatch.heads.registry import load_head
    from clipbatch.judge.score import score_root

    report = score_root("s3://bucket/emb", [load_head("aesthetic-laion-v2")])
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from clipbatch.config import StorageOptions
from clipbatch.faults import crash_point
from clipbatch.heads.base import Head
from clipbatch.io.storage import read_parquet_columns
from clipbatch.judge.store import JudgementIndex, remove_judgement, write_judgement
from clipbatch.sink.schema import decode_metadata
from clipbatch.tables.snapshot import Snapshot, TableFile, snapshot
from clipbatch.tables.vectors import embedding_matrix

log = logging.getLogger(__name__)

SCORE_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("file", pa.string()),
        pa.field("score", pa.float32()),
    ]
)


@dataclass
class HeadReport:
    head: str
    sha256: str
    files_scored: int = 0
    files_current: int = 0
    rows: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ScoreReport:
    root: str
    heads: list[HeadReport] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"root": self.root, "heads": [h.as_dict() for h in self.heads]}


def score_root(
    root: str,
    heads: list[Head],
    storage: StorageOptions | None = None,
    run_meta: dict[str, Any] | None = None,
) -> ScoreReport:
    """Score the new and rewritten shard files under ``root`` with each head.

    Example::

        from clipbatch.heads.registry import load_head
        from clipbatch.judge.score import score_root

        report = score_root("s3://bucket/emb/vit-l-14", [load_head("aesthetic-laion-v2")])
        report.heads[0].files_scored, report.heads[0].files_current
    """
    snap = snapshot(root, storage)
    report = ScoreReport(root)
    for head in heads:
        start = time.perf_counter()
        out = HeadReport(head.name, head.sha256)
        for table in snap.tables:
            _score_table(snap, table, head, out, storage, run_meta or {})
        out.seconds = round(time.perf_counter() - start, 3)
        report.heads.append(out)
        log.info(
            "head %s: %d file(s) scored, %d current, %d rows in %.1fs",
            head.name, out.files_scored, out.files_current, out.rows, out.seconds,
        )  # fmt: skip
    return report


def table_uri(snap: Snapshot, table: str) -> str:
    return f"{snap.root.rstrip('/')}/{table}" if table else snap.root


def _score_table(
    snap: Snapshot,
    table: str,
    head: Head,
    out: HeadReport,
    storage: StorageOptions | None,
    run_meta: dict[str, Any],
) -> None:
    files = [f for f in snap.files if f.table == table]
    uri = table_uri(snap, table)
    index = JudgementIndex.read(uri, head.name, storage)
    todo = [f for f in files if not index.current(_shard(f), f.version, head.sha256)]
    out.files_current += len(files) - len(todo)
    checked = False
    for file in todo:
        data = read_parquet_columns(snap.fs, file.path, ["key", head.spec.column])
        if data is None:
            continue
        if not checked:  # the table's model, from the footer this read brought
            model = (decode_metadata(data.schema.metadata) or {}).get("model") or {}
            head.check_table(model)
            checked = True
        vectors, valid = embedding_matrix(data.column(head.spec.column))
        scores = np.full(data.num_rows, np.nan, np.float32)
        if valid.any():
            scores[valid] = head.score(vectors[valid])
        table_out = pa.table(
            {
                "key": data.column("key"),
                "file": pa.array([file.name] * data.num_rows, pa.string()),
                "score": pa.array(scores, mask=~valid),
            },
            schema=SCORE_SCHEMA,
        )
        write_judgement(uri, head.name, _shard(file), table_out, {
            "judge": head.identity(),
            "table_file": file.name,
            "table_file_version": file.version,
            "column": head.spec.column,
            "run": run_meta,
        }, storage)  # fmt: skip
        index.entries[_shard(file)] = {
            "file_version": file.version,
            "judge": head.sha256,
            "rows": data.num_rows,
        }
        out.files_scored += 1
        out.rows += data.num_rows
    gone = set(index.entries) - {_shard(f) for f in files}
    for shard in gone:  # a shard file no longer in the table: its judgement goes too
        remove_judgement(uri, head.name, shard, storage)
        index.entries.pop(shard)
    if todo or gone:
        crash_point("judge_before_index", head.name)
        index.write()


def _shard(file: TableFile) -> str:
    return file.name[: -len(".parquet")]
