"""Nightly table roots for curation tests: written by the pipeline (tiny model, CPU),
with failed rows, planted byte copies of earlier images, and known scores."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from clipbatch.judge.store import JudgementIndex, write_judgement
from clipbatch.synthetic import write_webdataset
from clipbatch.tables.snapshot import snapshot
from clipbatch.tables.vectors import embedding_matrix
from tests.serve.tables import embed, tiny_config


def images_of(wds: Path) -> dict[str, bytes]:
    """Every image of a source folder's tars, by key."""
    out = {}
    for path in sorted(wds.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                if m.name.endswith(".jpg"):
                    out[m.name[: -len(".jpg")]] = tar.extractfile(m).read()
    return out


def add_members(tar_path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(tar_path, "a") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def night(
    root: Path,
    date: str,
    seed: int,
    copies: dict[str, bytes] | None = None,
    failures: bool = False,
    shards: int = 2,
    per_shard: int = 8,
) -> tuple[Path, dict[str, str]]:
    """A night's source (``root/src/{date}``) embedded into ``root/emb/date={date}``.

    ``copies``: {original key: its image bytes}, planted as byte copies under new keys
    ``{date}-copy-{n}`` in the last shard. Returns the table and {copy key: original}."""
    src = root / "src" / date
    paths = write_webdataset(src, shards=shards, per_shard=per_shard, seed=seed, size=48)
    planted: dict[str, str] = {}
    members: dict[str, bytes] = {}
    for n, (original, data) in enumerate(sorted((copies or {}).items())):
        key = f"{date}-copy-{n}"
        members[f"{key}.jpg"] = data
        members[f"{key}.txt"] = f"a copy of {original}".encode()
        planted[key] = original
    if failures:
        members["zz-no-image.txt"] = b"a caption whose image is missing"
        members["zz-not-an-image.jpg"] = b"this is not a jpeg"
        members["zz-not-an-image.txt"] = b"a caption with a broken image"
    if members:
        add_members(paths[-1], members)
    table = root / "emb" / f"date={date}"
    embed(tiny_config(str(src), str(table)))
    return table, planted


def write_known_scores(root: Path, name: str, score: Callable[[str], float | None]) -> None:
    """A judgement ``name`` beside every table under ``root``, as a scorer writes it,
    with ``score(key)`` as each row's value; rows without an image vector get none."""
    snap = snapshot(str(root))
    for table in snap.tables:
        uri = f"{root}/{table}" if table else str(root)
        index = JudgementIndex.read(uri, name)
        for file in (f for f in snap.files if f.table == table):
            rows = pq.read_table(file.path, columns=["key", "image_embedding"])
            keys = rows.column("key").to_pylist()
            _, has_vector = embedding_matrix(rows.column("image_embedding"))
            shard = file.name[: -len(".parquet")]
            values = [score(k) if has else None for k, has in zip(keys, has_vector, strict=True)]
            data = pa.table(
                {
                    "key": keys,
                    "file": [file.name] * len(keys),
                    "score": pa.array(values, pa.float32()),
                }
            )
            write_judgement(uri, name, shard, data, {"judge": {"name": name}})
            index.entries[shard] = {"file_version": file.version, "judge": f"known-{name}"}
        index.write()
