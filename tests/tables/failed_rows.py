"""A small table with failed rows, written by clipbatch's own writer (no Prefect), and an
old-style copy of it (null vectors, as releases before zero vectors wrote them).

Importable from any interpreter that can import clipbatch, so the floor venv
(``.venv-floor``, pyarrow 15) writes the same table in a subprocess:
``python -m tests.tables.failed_rows SOURCE DEST``.
"""

from __future__ import annotations

import io
import random
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.synthetic import jpeg_bytes, random_spec, render

# key -> (status, has an image vector, has a text vector), in table order, per shard.
SHARDS: list[dict[str, tuple[str, bool, bool]]] = [
    {
        "good-0": ("ok", True, True),
        "no-image": ("missing_image", False, True),
        "good-1": ("ok", True, True),
        "no-caption": ("missing_caption", True, False),
        "good-2": ("ok", True, True),
    },
    {
        "good-3": ("ok", True, True),
        "broken": ("decode_error", False, True),
        "good-4": ("ok", True, True),
        "../evil": ("unsafe_path", False, False),
        "good-5": ("ok", True, True),
    },
]
EXPECTED = {k: v for shard in SHARDS for k, v in shard.items()}
DIM = 64  # the built-in tiny model's


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_source(dest: Path) -> Path:
    """Two WebDataset shards holding every case of :data:`SHARDS`."""
    dest.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    for s, shard in enumerate(SHARDS):
        with tarfile.open(dest / f"{s:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, (status, _, _) in shard.items():
                spec = random_spec(rng)
                image = jpeg_bytes(render(spec, 32, rng))
                if status == "decode_error":
                    image = b""
                if status != "missing_image":
                    _add(tar, f"{key}.jpg", image)
                if status not in ("missing_caption", "unsafe_path"):
                    _add(tar, f"{key}.txt", spec.caption().encode())
    return dest


def embed(source: Path, dest: Path) -> Path:
    """The table of ``source``: the tiny model on the CPU, in this process, no Prefect."""
    from clipbatch.config import build_config
    from clipbatch.pipeline.worker import run_plan
    from clipbatch.plan.planner import plan_shards

    config = build_config(
        {
            "source": {"url": str(source)},
            "sink": {"url": str(dest)},
            "model": {"name": "tiny"},
            "runtime": {"device": "cpu", "batch_size": 4, "task_retries": 0},
        }
    )
    run_plan(plan_shards(config), "failed-rows")
    return dest


def to_null_vectors(table: pa.Table) -> pa.Table:
    """The previous writer's representation: a null where a row has no vector (a
    FixedSizeListArray with a validity mask), NaN values underneath."""
    from clipbatch.tables.vectors import embedding_matrix

    for column in ("image_embedding", "text_embedding"):
        typ = table.schema.field(column).type
        mat, valid = embedding_matrix(table.column(column))
        mat[~valid] = np.nan
        values = pa.array(mat.astype(typ.value_type.to_pandas_dtype()).reshape(-1))
        arr = pa.FixedSizeListArray.from_arrays(values, typ.list_size, mask=pa.array(~valid))
        table = table.set_column(table.schema.get_field_index(column), column, arr)
    return table


def write_old_table(new: Path, old: Path) -> Path:
    """A copy of the table ``new`` with null vectors (footers and commit index kept)."""
    import shutil

    shutil.copytree(new, old)
    for path in sorted(old.glob("*.parquet")):
        footer = {k: v for k, v in pq.read_metadata(path).metadata.items() if k != b"ARROW:schema"}
        pq.write_table(to_null_vectors(pq.read_table(path)).replace_schema_metadata(footer), path)
    return old


if __name__ == "__main__":
    embed(write_source(Path(sys.argv[1])), Path(sys.argv[2]))
