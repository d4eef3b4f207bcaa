"""SemDeDup: planted duplicates found, across nights, stably; pairs as exact as brute force."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipbatch.judge.semdedup import SemDedupSettings, semdedup_root
from clipbatch.judge.store import SCORES_DIR
from clipbatch.synthetic import write_webdataset
from tests.judge.tables import unit_rows, write_vector_table
from tests.serve.tables import embed, tiny_config

pytestmark = pytest.mark.timeout(300)


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _variant(data: bytes, how: str) -> bytes:
    if how == "copy":
        return data
    img = Image.open(io.BytesIO(data)).convert("RGB")
    if how == "resize":
        img = img.resize((img.width * 3 // 4, img.height * 3 // 4), Image.Resampling.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=55)  # re-encoded (and, for "resize", smaller too)
    return out.getvalue()


def night(root: Path, name: str, seed: int, copies_of: dict[str, bytes]) -> dict[str, str]:
    """A night's shard: distinct images, plus planted variants of ``copies_of`` images.
    Returns {planted key: the key it copies}."""
    src = root / "src" / name
    [tar_path] = write_webdataset(src, shards=1, per_shard=40, seed=seed, size=128)
    planted = {}
    with tarfile.open(tar_path, "a") as tar:
        for n, (key, data) in enumerate(copies_of.items()):
            how = ("copy", "reencode", "resize")[n % 3]
            copy = f"zz{name[-2:]}-{how}-{key}"
            _add(tar, f"{copy}.jpg", _variant(data, how))
            _add(tar, f"{copy}.txt", b"a planted near-duplicate")
            planted[copy] = key
    embed(tiny_config(str(src), str(root / "emb" / f"date={name}")))
    return planted


def images(tar_dir: Path, keys: list[str]) -> dict[str, bytes]:
    [tar_path] = sorted(tar_dir.glob("*.tar"))
    with tarfile.open(tar_path) as tar:
        return {k: tar.extractfile(f"{k}.jpg").read() for k in keys}


def groups(table: Path) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(table / SCORES_DIR / "semdedup-0.05").to_pylist()}


def test_planted_duplicates_across_nights_stably(tmp_path: Path) -> None:
    settings = SemDedupSettings(eps=0.05)
    first_keys = [f"{i:09d}" for i in range(0, 6)]
    night1 = tmp_path / "emb" / "date=2026-11-01"
    planted1 = night(tmp_path, "2026-11-01", 1, {})
    originals = images(tmp_path / "src" / "2026-11-01", first_keys)
    # Night 1 has its own planted copies too: a copy, a re-encode and a resize of its images.
    planted1 = night(tmp_path, "2026-11-01b", 1, originals)  # a second table the same night
    report1 = semdedup_root(str(tmp_path / "emb"), settings)
    assert report1.trained and report1.files_new == 2
    table_b = tmp_path / "emb" / "date=2026-11-01b"
    g1 = groups(night1)
    gb = groups(table_b)
    for copy, original in planted1.items():
        assert gb[copy]["rank"] >= 1, copy
        assert gb[copy]["group"] == g1[original]["group"] == f"date=2026-11-01/{original}"
    assert all(g1[k]["rank"] == 0 for k in first_keys)
    before = {p: p.read_bytes() for p in (night1 / SCORES_DIR).rglob("*.parquet")}

    # Night 2: more copies of night 1's images; checked against every earlier row.
    planted2 = night(tmp_path, "2026-11-02", 2, originals)
    report2 = semdedup_root(str(tmp_path / "emb"), settings)
    assert not report2.trained and report2.files_new == 1
    g2 = groups(tmp_path / "emb" / "date=2026-11-02")
    for copy, original in planted2.items():
        assert g2[copy]["group"] == f"date=2026-11-01/{original}" and g2[copy]["rank"] >= 2, copy
    # Earlier results are never rewritten: yesterday's selection stays as it was.
    assert {p: p.read_bytes() for p in (night1 / SCORES_DIR).rglob("*.parquet")} == before
    assert semdedup_root(str(tmp_path / "emb"), settings).files_new == 0


def exact_pairs(vectors: np.ndarray, keys: list[str], threshold: float) -> set[frozenset]:
    pairs = set()
    for start in range(0, len(vectors), 2048):
        sims = vectors[start : start + 2048] @ vectors.T
        for a, b in zip(*np.nonzero(sims >= threshold), strict=True):
            i = start + int(a)
            if i < b:
                pairs.add(frozenset((keys[i], keys[int(b)])))
    return pairs


def test_pairs_match_exact_pairs_at_the_default_settings(tmp_path: Path) -> None:
    """20,000 clustered vectors with planted near-copies, in two nights; the default k
    (about one cluster per 1,000 vectors). Pairs found against every pair brute force
    finds at the same eps: recall and precision >= 0.99."""
    rng = np.random.default_rng(5)
    centers = unit_rows(rng, 200, 64)
    base = (
        centers[rng.integers(0, 200, 19_000)]
        + rng.standard_normal((19_000, 64)).astype(np.float32) * 0.35
    )
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    originals = rng.choice(19_000, 1_000, replace=False)
    copies = base[originals] + rng.standard_normal((1_000, 64)).astype(np.float32) * 0.02
    copies /= np.linalg.norm(copies, axis=1, keepdims=True)
    vectors = np.concatenate([base, copies])
    keys1 = write_vector_table(
        tmp_path / "emb" / "date=1",
        vectors[:10_000],
        {"name": "tiny", "checkpoint_sha256": "t" * 64},
        files=4,
    )
    assert semdedup_root(str(tmp_path / "emb"), SemDedupSettings(eps=0.05)).clusters == 10
    keys2 = write_vector_table(
        tmp_path / "emb" / "date=2",
        vectors[10_000:],
        {"name": "tiny", "checkpoint_sha256": "t" * 64},
        files=4,
        prefix="n",
    )
    report = semdedup_root(str(tmp_path / "emb"), SemDedupSettings(eps=0.05), collect_pairs=True)
    assert report.clusters == 10 and not report.trained  # trained once, on night 1
    stored = vectors.astype(np.float16).astype(np.float32)  # as the tables hold them
    stored /= np.linalg.norm(stored, axis=1, keepdims=True)
    ids = [f"date=1/{k}" for k in keys1] + [f"date=2/{k}" for k in keys2]
    exact = exact_pairs(stored, ids, 1 - 0.05)
    # Night 2 against every row: the pairs the incremental run found are all exact ones.
    incremental = {frozenset(p) for p in report.pairs}
    assert incremental and incremental <= exact
    # Every pair, from scratch at the default k (one cluster per ~1,000 vectors: 20).
    rebuilt = semdedup_root(
        str(tmp_path / "emb"), SemDedupSettings(eps=0.05, rebuild=True), collect_pairs=True
    )
    assert rebuilt.clusters == 20
    found = {frozenset(p) for p in rebuilt.pairs}
    assert len(exact) > 900  # the planted copies at least
    recall = len(found & exact) / len(exact)
    precision = len(found & exact) / len(found)
    assert recall >= 0.99 and precision >= 0.99, (recall, precision, len(exact), len(found))
