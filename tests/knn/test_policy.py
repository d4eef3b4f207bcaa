"""The kNN policy's branches on real tables: the automatic factory at its boundary sizes,
the rebuild when a Flat index passes ``FLAT_BELOW`` vectors, and the rebuild when another
factory is asked for.

Tables big enough to cross 20,000 vectors are written directly, as bench/knn.py writes
its table: clipbatch's schema (``build_schema``) and file metadata naming one model, with
8-dimensional float16 vectors, so each build takes a fraction of a second.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbatch.knn.build import build_index
from clipbatch.knn.policy import (
    FLAT_BELOW,
    SQ8_ABOVE,
    IndexSettings,
    auto_factory,
    default_nprobe,
    ivf_lists,
)
from clipbatch.knn.search import open_index
from clipbatch.knn.store import read_current
from clipbatch.sink.schema import build_schema, encode_metadata

pytestmark = pytest.mark.timeout(120)

DIM = 8
MODEL = {"name": "synthetic", "checkpoint_sha256": "5" * 64, "embed_dim": DIM}


def write_file(path: Path, rows: int, seed: int) -> None:
    """One shard file of ``rows`` rows, each with an image vector: clipbatch's schema."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    schema = build_schema(DIM, "float16", []).with_metadata(encode_metadata({"model": MODEL}))
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float16).ravel()), DIM)
    columns = {f.name: pa.nulls(rows, f.type) for f in schema}
    columns["key"] = pa.array([f"{path.stem}-{seed}-{i:06d}" for i in range(rows)])
    columns["status"] = pa.array(["ok"] * rows)
    columns["image_embedding"] = emb
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns, schema=schema), path)


def write_night(root: Path, night: int, files: int, per_file: int) -> None:
    for f in range(files):
        write_file(
            root / f"date=2026-11-{night:02d}" / f"{f:05d}.parquet", per_file, 100 * night + f
        )


def test_auto_factory_at_its_boundary_sizes() -> None:
    assert auto_factory(1) == "Flat"
    assert auto_factory(FLAT_BELOW - 1) == "Flat"
    for n in (FLAT_BELOW, 1_000_000, SQ8_ABOVE, SQ8_ABOVE + 1, 100_000_000):
        factory = auto_factory(n)
        nlist = ivf_lists(factory)
        # nlist is a power of two about 4 sqrt(N): the nearest in log scale.
        assert nlist & (nlist - 1) == 0 and nlist >= 16, factory
        assert 4 * math.sqrt(n) / math.sqrt(2) <= nlist <= 4 * math.sqrt(n) * math.sqrt(2)
        assert factory == f"IVF{nlist},{'SQ8' if n > SQ8_ABOVE else 'Flat'}"
        assert default_nprobe(factory) == nlist // 16
    assert auto_factory(FLAT_BELOW) == "IVF512,Flat"  # 4 sqrt(20,000) = 566
    assert auto_factory(SQ8_ABOVE) == "IVF8192,Flat"  # the last size without compression
    assert auto_factory(SQ8_ABOVE + 1) == "IVF8192,SQ8"
    assert default_nprobe("Flat") == 1


@pytest.mark.parametrize(
    ("vectors", "factory"), [(FLAT_BELOW - 1, "Flat"), (FLAT_BELOW, "IVF512,Flat")]
)
def test_a_built_index_takes_the_automatic_factory_at_the_boundary(
    tmp_path: Path, vectors: int, factory: str
) -> None:
    root = tmp_path / "emb"
    write_file(root / "date=2026-11-01" / "00000.parquet", vectors - 1000, 1)
    write_file(root / "date=2026-11-01" / "00001.parquet", 1000, 2)
    report = build_index(str(root), "image")
    assert (report.mode, report.factory, report.vectors) == ("built", factory, vectors)
    current = read_current(str(root), "image")
    assert current is not None and current.info["factory"] == factory
    index = open_index(str(root), "image")
    assert index is not None and index.index.ntotal == vectors
    # The index's own type is the factory's: exact (IDMap2 over Flat) or inverted lists.
    import faiss

    if factory == "Flat":
        assert isinstance(faiss.downcast_index(index.index), faiss.IndexIDMap2)
    else:
        assert faiss.extract_index_ivf(index.index).nlist == 512


def test_a_flat_index_is_rebuilt_once_it_passes_flat_below(tmp_path: Path) -> None:
    root = tmp_path / "emb"
    per_file = 1000
    write_night(root, 1, files=18, per_file=per_file)
    first = build_index(str(root), "image")
    assert (first.mode, first.factory, first.vectors) == ("built", "Flat", 18 * per_file)
    # 19,000 vectors: still below FLAT_BELOW, so the Flat index is updated in place.
    write_night(root, 2, files=1, per_file=per_file)
    second = build_index(str(root), "image")
    assert (second.mode, second.factory, second.vectors) == ("updated", "Flat", 19 * per_file)
    assert second.added == per_file
    # 20,000 vectors: past an exact index, rebuilt from scratch with the automatic factory.
    write_night(root, 3, files=1, per_file=per_file)
    third = build_index(str(root), "image")
    assert third.mode == "built" and third.vectors == FLAT_BELOW
    assert third.factory == auto_factory(FLAT_BELOW) == "IVF512,Flat"
    assert any("past an exact index" in r for r in third.reasons), third.reasons
    current = read_current(str(root), "image")
    assert current is not None and current.info["factory"] == "IVF512,Flat"
    assert current.info["trained_on"] == FLAT_BELOW


def test_asking_for_another_factory_rebuilds_and_the_same_one_does_not(tmp_path: Path) -> None:
    root = tmp_path / "emb"
    write_night(root, 1, files=2, per_file=500)
    built = build_index(str(root), "image", IndexSettings(factory="Flat"))
    assert (built.mode, built.factory) == ("built", "Flat")
    # The same factory again, or auto (which keeps what is there): nothing to do.
    assert build_index(str(root), "image", IndexSettings(factory="Flat")).mode == "current"
    assert build_index(str(root), "image").mode == "current"
    # Another factory, on an unchanged table: rebuilt, and says why.
    other = build_index(str(root), "image", IndexSettings(factory="IVF16,Flat"))
    assert (other.mode, other.factory, other.vectors) == ("built", "IVF16,Flat", 1000)
    assert other.reasons == ["another factory (IVF16,Flat)"]
    assert read_current(str(root), "image").info["factory"] == "IVF16,Flat"
    assert build_index(str(root), "image", IndexSettings(factory="IVF16,Flat")).mode == "current"
