"""Curation end to end on nightly tables written by the pipeline (tiny model, CPU).

Planted byte copies, failed rows and known scores; the selection and the curated shards
are checked against the tables, the scores and the source tars themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from clipbatch.curate.run import curate_root
from clipbatch.curate.spec import load_spec
from clipbatch.curate.store import SelectionState
from clipbatch.errors import ConfigError
from clipbatch.tables.table import open_tables
from clipbatch.tables.vectors import embedding_matrix
from tests.curate.roots import images_of, night, write_known_scores
from tests.paths import REPO

pytestmark = pytest.mark.timeout(300)


def aesthetic(key: str) -> float:
    """Known scores: a function of the key every test can recompute."""
    return float(int.from_bytes(key.encode(), "little") % 97) / 10  # 0.0 .. 9.6


def spec(tmp: Path, name: str = "s", rows_per_shard: int = 5, **rules: object) -> dict:
    return {"name": name, "rules": rules, "output": {"url": str(tmp / f"out-{name}"),
            "rows_per_shard": rows_per_shard}}  # fmt: skip


def table_rows(root: Path) -> dict[str, dict]:
    """Every row of every table under root, by table/key."""
    out = {}
    for table in open_tables(str(root)):
        name = table.dest.rstrip("/").rsplit("/", 1)[-1]
        data = table.read_all()
        _, has_vector = embedding_matrix(data.column("image_embedding"))
        rows = data.drop_columns(["image_embedding", "text_embedding"]).to_pylist()
        for row, has in zip(rows, has_vector, strict=True):
            out[f"{name}/{row['key']}"] = {**row, "image_embedding_ok": bool(has)}
    return out


def selection(root: Path, name: str) -> dict[str, dict]:
    state = SelectionState.read(str(root), name)
    out = {}
    for file_key, entry in state.files.items():
        table = file_key.rsplit("/", 1)[0] if "/" in file_key else ""
        for r in pq.read_table(root / "_curate" / name / entry["selection"]).to_pylist():
            out[f"{table}/{r['key']}"] = r
    return out


def shards(out: Path) -> dict[str, dict[str, bytes]]:
    """Every curated sample: {sample key: {ext: bytes}}, from the .tar files."""
    samples: dict[str, dict[str, bytes]] = {}
    for path in sorted(out.glob("*.tar")):
        with tarfile.open(path) as tar:
            for m in tar:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


@pytest.fixture(scope="module")
def one_night(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """One night with failed rows and byte copies of three of its own images."""
    base = tmp_path_factory.mktemp("curate")
    first = base / "first"
    first_table, _ = night(first, "2026-11-01", seed=1, shards=1)
    originals = dict(sorted(images_of(first / "src" / "2026-11-01").items())[:3])
    # The night proper: its own images plus the copies (a second table that night).
    shutil.rmtree(first / "emb")
    table, planted = night(base, "2026-11-01", seed=1, copies=originals, failures=True, shards=1)
    write_known_scores(base / "emb", "aesthetic-laion-v2", aesthetic)
    return base / "emb", planted


@pytest.mark.parametrize(
    "rules",
    [
        {"min_similarity": None},
        {"status_ok": False, "min_similarity": "median"},
        {
            "status_ok": False,
            "min_similarity": None,
            "scores": {"aesthetic-laion-v2": {"min": 4.5}},
        },
        {
            "status_ok": False,
            "min_similarity": None,
            "scores": {"aesthetic-laion-v2": {"max": 4.5}},
        },
        {"status_ok": False, "min_similarity": None, "unique": 0.05},
        {"min_similarity": "median", "scores": {"aesthetic-laion-v2": {"min": 2}}, "unique": 0.05},
    ],
    ids=["status", "similarity", "score-min", "score-max", "unique", "combined"],
)
def test_every_rule_alone_and_combined_on_a_real_table(
    one_night: tuple[Path, dict[str, str]], tmp_path: Path, rules: dict
) -> None:
    root, planted = one_night
    rows = table_rows(root)
    sims = [r["similarity"] for r in rows.values() if r["similarity"] is not None]
    if rules.get("min_similarity") == "median":
        rules = {**rules, "min_similarity": float(np.median(sims))}
    name = f"r{abs(hash(json.dumps(rules, sort_keys=True))) % 10**8}"
    report = curate_root(str(root), spec(tmp_path, name, **rules))
    got = selection(root, name)
    assert got.keys() == rows.keys()
    expected_kept = set()
    for key, row in rows.items():
        ok = True
        if rules.get("status_ok", True):
            ok &= row["status"] == "ok"
        low = rules.get("min_similarity", 0.28)
        if low is not None:
            ok &= row["similarity"] is not None and row["similarity"] >= low
        for bound in (rules.get("scores") or {}).values():
            s = aesthetic(row["key"]) if row["image_embedding_ok"] else None
            ok &= s is not None and (bound.get("min") is None or s >= bound["min"] - 1e-6)
            ok &= s is not None and (bound.get("max") is None or s <= bound["max"] + 1e-6)
        if rules.get("unique"):
            ok &= row["key"] not in planted  # a byte copy: the original came first
        ok &= row["image_sha256"] is not None  # no image to ship: dropped when copying
        if ok:
            expected_kept.add(key)
    assert {k for k, r in got.items() if r["keep"]} == expected_kept
    assert report.kept == len(expected_kept) and report.dropped == len(rows) - len(expected_kept)
    for r in got.values():  # a dropped row says why; a kept one is in a shard
        assert bool(r["reasons"]) != r["keep"], r
        assert (r["shard"] is not None) == r["keep"]
    if rules.get("unique"):
        for copy, original in planted.items():
            assert (
                f"duplicate: of date=2026-11-01/{original}"
                in got[f"date=2026-11-01/{copy}"]["reasons"]
            )
    assert len(shards(tmp_path / f"out-{name}")) == len(expected_kept)


def test_curated_shards_hold_the_source_bytes_with_caption_scores_and_lineage(
    one_night: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, _ = one_night
    spec_ = spec(tmp_path, "bytes", rows_per_shard=4, min_similarity=None,
                 scores={"aesthetic-laion-v2": {"min": 0}})  # fmt: skip
    report = curate_root(str(root), spec_)
    out = tmp_path / "out-bytes"
    sources = images_of(root.parent / "src" / "2026-11-01")
    rows = table_rows(root)
    got = selection(root, "bytes")
    samples = shards(out)
    assert len(samples) == report.kept == sum(r["keep"] for r in got.values())
    by_sample = {r["sample_key"]: (k, r) for k, r in got.items() if r["keep"]}
    for sample, members in samples.items():
        table_key, _ = by_sample[sample]
        row = rows[table_key]
        image = next(v for e, v in members.items() if e in ("jpg", "png", "webp"))
        assert image == sources[row["key"]]  # byte for byte, never re-encoded
        assert members["txt"].decode() == row["caption"]
        meta = json.loads(members["json"])
        assert meta["key"] == sample and meta["sha256"] == row["image_sha256"].hex()
        assert meta["source"]["key"] == row["key"] and meta["source"]["table"] == "date=2026-11-01"
        assert meta["scores"]["aesthetic-laion-v2"] == pytest.approx(
            aesthetic(row["key"]), abs=1e-5
        )
    for tar in sorted(out.glob("*.tar")):
        stem = tar.name[: -len(".tar")]
        table = pq.read_table(out / f"{stem}.parquet")
        in_tar = sorted(k for k in samples if k.startswith(stem))
        assert sorted(table.column("key").to_pylist()) == in_tar and len(in_tar) <= 4
        stats = json.loads((out / f"{stem}_stats.json").read_text())
        assert stats["count"] == len(in_tar)
        assert stats["spec"]["identity"] == load_spec(spec_).identity()
        assert stats["judgements"]["aesthetic-laion-v2"] == "known-aesthetic-laion-v2"
        assert {f["table"] for f in stats["table"]["files"]} == {"date=2026-11-01"}
    assert not (out / "_staging").exists()


def test_two_nights_keep_night_ones_selection_and_drop_its_new_duplicates(tmp_path: Path) -> None:
    root = tmp_path / "emb"
    night(tmp_path, "2026-11-01", seed=1)
    spec_ = spec(tmp_path, "nightly", min_similarity=None, unique=0.05)
    curate_root(str(root), spec_)
    out = tmp_path / "out-nightly"
    shipped = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()}
    first = selection(root, "nightly")
    files = {
        p: p.read_bytes() for p in (root / "_curate" / "nightly" / "selection").rglob("*.parquet")
    }
    kept_first = {k: r for k, r in first.items() if r["keep"]}
    # Night two: new images, and byte copies of three images night one kept.
    sources = images_of(tmp_path / "src" / "2026-11-01")
    copies = {k.split("/")[1]: sources[k.split("/")[1]] for k in sorted(kept_first)[:3]}
    _, planted = night(tmp_path, "2026-11-02", seed=2, copies=copies)
    report = curate_root(str(root), spec_)
    assert report.files_current == 2 and report.files_decided == 2
    # Night one's selection, files and shards: unchanged, byte for byte.
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.iterdir()
            if p.name in shipped} == shipped  # fmt: skip
    assert {p: p.read_bytes() for p in files} == files
    second = selection(root, "nightly")
    assert {k: r for k, r in second.items() if k.startswith("date=2026-11-01/")} == first
    # Night two's copies of kept rows: dropped as duplicates of them; its new rows kept.
    for copy, original in planted.items():
        row = second[f"date=2026-11-02/{copy}"]
        assert not row["keep"] and row["reasons"] == [f"duplicate: of date=2026-11-01/{original}"]
    new = [r for k, r in second.items() if k.startswith("date=2026-11-02/") and r["keep"]]
    assert len(new) == 16  # every new distinct image
    numbers = sorted(int(p.name[:5]) for p in out.glob("*.tar"))
    assert numbers == list(range(len(numbers)))  # new shards follow, numbered on
    assert {r["shard"] for r in new}.isdisjoint({r["shard"] for r in kept_first.values()})
    # A third run with nothing new: nothing decided, nothing shipped.
    again = curate_root(str(root), spec_)
    assert (again.files_decided, again.shards) == (0, [])


CURATE = """
import sys
from clipbatch.curate.run import curate_root
curate_root(sys.argv[1], sys.argv[2])
"""


def crash_curation(root: Path, spec_path: Path, point: str) -> None:
    """``curate_root`` in a child process, SIGKILLed at the crash point ``point``."""
    env = {**os.environ, "CLIPBATCH_CRASH_AT": point, "PYTHONPATH": str(REPO)}
    crashed = subprocess.run(
        [sys.executable, "-c", CURATE, str(root), str(spec_path)],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert crashed.returncode == -9, crashed.stderr[-2000:]


@pytest.mark.parametrize(
    "point", ["curate_mid_write", "curate_before_commit", "curate_before_publish"]
)
def test_a_crash_leaves_no_visible_partial_shard_and_a_rerun_finishes(
    tmp_path: Path, point: str
) -> None:
    root = tmp_path / "emb"
    night(tmp_path, "2026-11-01", seed=3)
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec(tmp_path, "crash", rows_per_shard=3, min_similarity=None)))
    clean_root = tmp_path / "clean"
    shutil.copytree(root, clean_root / "emb")
    crash_curation(root, path, point)
    out = tmp_path / "out-crash"
    assert not list(out.glob("*.tar")) and not list(out.glob("*.parquet"))  # nothing visible
    committed = SelectionState.read(str(root), "crash")
    assert (committed is not None) == (point == "curate_before_publish")
    report = curate_root(str(root), str(path))
    # Finished: the same shards a run without a crash makes, byte for byte.
    clean_spec = {**json.loads(path.read_text())}
    clean_spec["output"] = {**clean_spec["output"], "url": str(clean_root / "out")}
    curate_root(str(clean_root / "emb"), clean_spec)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in (clean_root / "out").iterdir()
    )
    for tar in out.glob("*.tar"):
        assert tar.read_bytes() == (clean_root / "out" / tar.name).read_bytes()
    assert len(shards(out)) == sum(r["keep"] for r in selection(root, "crash").values())
    assert report.kept + report.dropped in (0, 16) and not (out / "_staging").exists()


@pytest.mark.parametrize("point", ["curate_before_commit", "curate_before_publish"])
def test_on_s3_a_crash_leaves_uploads_unseen_and_a_rerun_completes_or_aborts_them(
    tmp_path: Path, s3_bucket: str, s3_endpoint: str, point: str
) -> None:
    """On S3, shards are staged as multipart uploads to their final keys, not completed:
    before the commit a crash leaves nothing listed and the rerun aborts them; after it,
    the rerun completes them. Either way the shards are a clean run's, byte for byte."""
    import boto3

    root = tmp_path / "emb"
    night(tmp_path, "2026-11-01", seed=3)
    body = spec(tmp_path, "crash", rows_per_shard=3, min_similarity=None)
    body["output"] = {**body["output"], "url": f"s3://{s3_bucket}/curated",
                      "storage": {"endpoint_url": s3_endpoint}}  # fmt: skip
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(body))
    crash_curation(root, path, point)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")

    def listed() -> list[str]:
        page = s3.list_objects_v2(Bucket=s3_bucket, Prefix="curated/")
        return sorted(o["Key"].split("/", 1)[1] for o in page.get("Contents", []))

    def uploads() -> list[str]:
        page = s3.list_multipart_uploads(Bucket=s3_bucket, Prefix="curated/")
        return sorted(u["Key"] for u in page.get("Uploads", []))

    assert listed() == []  # nothing visible, nothing staged as a copy
    assert len(uploads()) == 3 * 6  # 16 rows, 3 a shard: 6 shards of 3 files each
    assert (SelectionState.read(str(root), "crash") is not None) == (
        point == "curate_before_publish"
    )
    curate_root(str(root), str(path))
    assert uploads() == []  # completed, or aborted and uploaded again
    clean = {**body, "output": {"url": str(tmp_path / "clean"), "rows_per_shard": 3}}
    curate_root(str(root), {**clean, "name": "clean"})
    expected = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert listed() == expected
    for name in expected:
        if name.endswith(".tar"):
            got = s3.get_object(Bucket=s3_bucket, Key=f"curated/{name}")["Body"].read()
            assert got == (tmp_path / "clean" / name).read_bytes()


def test_a_changed_source_image_is_a_recorded_drop_not_a_copy(tmp_path: Path) -> None:
    root = tmp_path / "emb"
    night(tmp_path, "2026-11-01", seed=4, shards=1)
    tar_path = tmp_path / "src" / "2026-11-01" / "00000.tar"
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
    with tar_path.open("r+b") as f:  # the same size, other bytes: the source changed
        f.seek(member.offset_data + member.size // 2)
        f.write(b"\x00" * 16)
    report = curate_root(str(root), spec(tmp_path, "changed", min_similarity=None))
    row = selection(root, "changed")[f"date=2026-11-01/{member.name[:-4]}"]
    assert not row["keep"] and row["shard"] is None
    assert row["reasons"][0].startswith("image: ") and "source changed" in row["reasons"][0]
    assert report.reasons["image"] == 1 and len(shards(tmp_path / "out-changed")) == 7


def test_spec_errors_come_before_any_work(
    one_night: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    root, _ = one_night
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    unknown = spec(tmp_path, "unknown", unique=0.1, scores={"nsfw-laion-l14": {"max": 0.5}})
    with pytest.raises(
        ConfigError, match="nsfw-laion-l14, which .* does not have .*aesthetic-laion-v2"
    ):
        curate_root(str(root), unknown)
    wrong_head = {**spec(tmp_path, "wrong"), "heads": {"aesthetic": "nsfw-laion-b32=/nowhere"}}
    with pytest.raises(ConfigError, match="no file"):
        curate_root(str(root), wrong_head)
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # nothing written
    assert not (tmp_path / "out-unknown").exists()
    curate_root(str(root), spec(tmp_path, "fixed", min_similarity=0.1))
    with pytest.raises(ConfigError, match="never edited: give the changed spec a new name"):
        curate_root(str(root), spec(tmp_path, "fixed", min_similarity=0.2))


def test_a_rewritten_file_keeps_its_kept_rows_in_their_shards(tmp_path: Path) -> None:
    root = tmp_path / "emb"
    table, _ = night(tmp_path, "2026-11-01", seed=5, failures=True, shards=1)
    spec_ = spec(tmp_path, "retry", min_similarity=None)
    curate_root(str(root), spec_)
    before = selection(root, "retry")
    tars = {p.name: p.read_bytes() for p in (tmp_path / "out-retry").glob("*.tar")}
    rewritten = table / "00000.parquet"  # a retry commits a new version of the file
    stat = rewritten.stat()
    os.utime(rewritten, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    report = curate_root(str(root), spec_)
    after = selection(root, "retry")
    assert report.files_decided == 1 and report.shards == []  # nothing shipped twice
    for key, row in before.items():
        assert (after[key]["keep"], after[key]["shard"], after[key]["sample_key"]) == (
            row["keep"], row["shard"], row["sample_key"])  # fmt: skip
    assert {p.name: p.read_bytes() for p in (tmp_path / "out-retry").glob("*.tar")} == tars
    assert len(list((root / "_curate" / "retry" / "selection").rglob("*.parquet"))) == 1
