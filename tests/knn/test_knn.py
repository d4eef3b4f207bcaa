"""Issue 18: kNN indexes of a table (``{root}/_knn/{name}/``), kept current.

Tables are written by the library itself (the tiny model on the CPU), as nightly
``date=…/`` partitions under one root, one with every kind of bad row. The indexes are
built, updated, crashed and searched the way users do: the library, the CLI, and on
moto's S3 with a counting proxy in front.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import faiss
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from clipbatch_flows.cli.main import main as cli

from clipbatch.config import StorageOptions, build_config
from clipbatch.io.storage import get_fs
from clipbatch.knn.build import NoVectorsError, build_index, build_indexes
from clipbatch.knn.policy import IndexSettings
from clipbatch.knn.search import index_staleness, open_index
from clipbatch.knn.store import KNN_DIR, list_indexes, read_current
from clipbatch.pipeline.worker import run_plan
from clipbatch.plan.planner import plan_shards
from clipbatch.query.search import search_root
from clipbatch.synthetic import write_webdataset
from clipbatch.tables.snapshot import partition_root
from clipbatch.tables.table import open_tables
from clipbatch.tables.vectors import embedding_matrix, normalize_rows
from tests.conftest import upload_dir
from tests.corpus import write_webdataset_corpus
from tests.faultproxy import FaultProxy
from tests.helpers import tiny_s3_config
from tests.paths import REPO

pytestmark = pytest.mark.timeout(300)

ROOT = REPO
QUERIES = ["a red circle", "a small blue square on the left", "a green triangle"]


def embed(source: Path | str, dest: Path | str, **sink: object) -> None:
    config = build_config(
        {
            "source": str(source),
            "sink": {"url": str(dest), **sink},
            "model": "tiny",
            "runtime": {"device": "cpu", "batch_size": 8},
        }
    )
    run_plan(plan_shards(config), "test")


def partition(root: Path, day: str, shards: int = 2, per_shard: int = 6, seed: int = 0) -> Path:
    src = root / "src" / day
    write_webdataset(src, shards=shards, per_shard=per_shard, seed=seed, size=32)
    dest = root / "emb" / f"date={day}"
    embed(src, dest)
    return dest


def table_rows(root: Path, column: str) -> set[tuple[str, str, int, str]]:
    """(table, file, row, key) of every row under root that has a ``column`` vector."""
    out = set()
    for table in open_tables(str(root)):
        rel = table.dest.rstrip("/")[len(str(root).rstrip("/")) :].lstrip("/")
        for file in table.files:
            data = table.read(file, ["key", column])
            _, valid = embedding_matrix(data.column(column))
            keys = data.column("key").to_pylist()
            out |= {(rel, file.name, int(i), keys[i]) for i in np.flatnonzero(valid)}
    return out


def indexed_rows(root: Path, name: str) -> set[tuple[str, str, int, str]]:
    build = read_current(str(root), name)
    assert build is not None
    ids = build.ids(None).to_pylist()
    return {(r["table"], r["file"], r["row"], r["key"]) for r in ids}


def row_vector(root: Path, table: str, file: str, row: int, column: str) -> np.ndarray:
    data = pq.read_table(root / table / file, columns=[column])
    mat, valid = embedding_matrix(data.column(column))
    assert valid[row]
    return normalize_rows(mat[row : row + 1])[0]


@pytest.fixture(scope="module")
def two_nights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A partition root: two nightly tables, the second with every kind of bad row."""
    root = tmp_path_factory.mktemp("knn")
    partition(root, "2026-11-29", seed=1)
    write_webdataset_corpus(root / "src" / "2026-11-30")
    embed(root / "src" / "2026-11-30", root / "emb" / "date=2026-11-30")
    return root / "emb"


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat"])
def test_index_covers_exactly_the_rows_with_vectors_and_ids_map_to_keys(
    two_nights: Path, tmp_path: Path, factory: str
) -> None:
    root = tmp_path / "emb"
    subprocess.run(["cp", "-r", str(two_nights), str(root)], check=True)
    reports = build_indexes(str(root), settings=IndexSettings(factory=factory))
    assert [(r.name, r.mode, r.factory) for r in reports] == [
        ("image", "built", factory),
        ("text", "built", factory),
    ]
    for name, column in (("image", "image_embedding"), ("text", "text_embedding")):
        want = table_rows(root, column)
        got = indexed_rows(root, name)
        # Every row with a vector, no row without one (failed images, missing captions).
        assert got == want, (name, sorted(got ^ want)[:5])
        assert len(want) < sum(t.rows for t in open_tables(str(root)))  # bad rows exist
        index = open_index(str(root), name)
        assert index is not None and index.index.ntotal == len(want)
        # Each id holds its own row's vector: the id map points at the right key.
        if factory.startswith("IVF"):
            faiss.extract_index_ivf(index.index).make_direct_map()
        for r in index.ids.to_pylist():
            stored = index.index.reconstruct(int(r["id"]))
            expect = row_vector(root, r["table"], r["file"], r["row"], column)
            np.testing.assert_allclose(stored, expect, atol=1e-6)
            assert (
                pq.read_table(root / r["table"] / r["file"], columns=["key"])
                .column("key")[r["row"]]
                .as_py()
                == r["key"]
            )


def test_search_with_the_index_agrees_with_brute_force(two_nights: Path, tmp_path: Path) -> None:
    root = tmp_path / "emb"
    subprocess.run(["cp", "-r", str(two_nights), str(root)], check=True)
    brute, method = search_root(str(root), QUERIES, k=5)
    assert method.kind == "brute force" and "no kNN index" in method.detail
    for factory, nprobe in (("Flat", None), ("IVF4,Flat", 4)):  # IVF probing every list
        build_index(str(root), "image", IndexSettings(factory=factory, nprobe=nprobe, rebuild=True))
        hits, method = search_root(str(root), QUERIES, k=5)
        assert method.kind == "knn" and factory in method.detail and not method.stale
        for b, h in zip(brute, hits, strict=True):
            assert [x.where for x in h] == [x.where for x in b], factory
            np.testing.assert_allclose([x.score for x in h], [x.score for x in b], atol=1e-5)
            assert [x.caption for x in h] == [x.caption for x in b]
    # Asked to, the search reads every row even with an index, and says so.
    again, method = search_root(str(root), QUERIES, k=5, use_index=False)
    assert method.kind == "brute force" and "asked to" in method.detail
    assert [[x.where for x in q] for q in again] == [[x.where for x in q] for q in brute]


def test_nightly_partitions_are_added_incrementally(tmp_path: Path) -> None:
    root = tmp_path / "emb"
    partition(tmp_path, "2026-11-01", seed=1)
    partition(tmp_path, "2026-11-02", seed=2)
    first = build_index(str(root), "image")
    assert (first.mode, first.vectors, first.files) == ("built", 24, 4)
    assert build_index(str(root), "image").mode == "current"

    # A new night: only its files are read and added; nothing is removed.
    partition(tmp_path, "2026-11-03", shards=1, seed=3)
    stale = index_staleness(str(root), "image", None)
    assert (
        stale is not None and stale.added == ["date=2026-11-03/00000.parquet"] and not stale.changed
    )
    update = build_index(str(root), "image")
    assert (update.mode, update.added, update.removed, update.vectors) == ("updated", 6, 0, 30)
    assert read_current(str(root), "image").info["parent"] == first.version

    # A night rewritten (new data, overwrite): its old ids go, its new rows come in.
    src = tmp_path / "src" / "2026-11-02"
    write_webdataset(src, shards=2, per_shard=5, seed=22, size=32)
    embed(src, root / "date=2026-11-02", overwrite=True)
    stale = index_staleness(str(root), "image", None)
    assert sorted(stale.changed) == [f"date=2026-11-02/0000{i}.parquet" for i in (0, 1)]
    rewrite = build_index(str(root), "image")
    assert (rewrite.mode, rewrite.added, rewrite.removed, rewrite.vectors) == (
        "updated", 10, 12, 28,
    )  # fmt: skip
    assert indexed_rows(root, "image") == table_rows(root, "image_embedding")
    ids = read_current(str(root), "image").ids(None).column("id").to_pylist()
    assert len(set(ids)) == len(ids) and max(ids) == 24 + 6 + 10 - 1  # never reused
    brute, _ = search_root(str(root), QUERIES, k=4, use_index=False)
    hits, method = search_root(str(root), QUERIES, k=4)
    assert method.kind == "knn" and not method.stale
    assert [[x.where for x in q] for q in hits] == [[x.where for x in q] for q in brute]
    # Only the current build and its parent are kept.
    versions = sorted(p.name for p in (root / KNN_DIR / "image").glob("v-*"))
    assert versions == sorted([rewrite.version, update.version])


def test_an_ivf_index_is_rebuilt_when_the_table_outgrows_its_training(tmp_path: Path) -> None:
    root = tmp_path / "emb"
    partition(tmp_path, "2026-11-01", seed=1)
    settings = IndexSettings(factory="IVF2,Flat")
    assert build_index(str(root), "image", settings).mode == "built"
    partition(tmp_path, "2026-11-02", shards=1, seed=2)
    assert build_index(str(root), "image", settings).mode == "updated"  # 18 <= 2 x 12
    partition(tmp_path, "2026-11-03", shards=2, seed=3)
    report = build_index(str(root), "image", settings)  # 30 > 2 x 12: retrain
    assert report.mode == "built" and report.vectors == 30
    assert any("grew more than" in r for r in report.reasons), report.reasons
    assert read_current(str(root), "image").info["trained_on"] == 30


def test_a_crash_mid_build_leaves_no_visible_index(tmp_path: Path) -> None:
    root = tmp_path / "emb"
    partition(tmp_path, "2026-11-01", seed=1)

    def index_cli(crash: str | None) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("CLIPBATCH_CRASH_AT", None)
        if crash:
            env["CLIPBATCH_CRASH_AT"] = crash
        cmd = [
            sys.executable,
            "-m",
            "clipbatch_flows.cli.main",
            "index",
            str(root),
            "--name",
            "image",
        ]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)

    # The first build dies with its index file staged: no index is visible.
    died = index_cli("knn_mid_stage:image")
    assert died.returncode == -9, died.stderr
    assert list((root / KNN_DIR / "image").glob("v-*/index.faiss"))  # it got that far
    assert read_current(str(root), "image") is None and list_indexes(str(root)) == []
    _, method = search_root(str(root), QUERIES[:1], k=3)
    assert method.kind == "brute force"

    done = index_cli(None)
    assert done.returncode == 0, done.stderr
    first = read_current(str(root), "image")
    assert first is not None and first.info["vectors"] == 12

    # An update dies staged and verified, just before its pointer: the old build stays.
    partition(tmp_path, "2026-11-02", shards=1, seed=2)
    died = index_cli("knn_before_pointer:image")
    assert died.returncode == -9, died.stderr
    current = read_current(str(root), "image")
    assert current is not None and current.version == first.version
    hits, method = search_root(str(root), QUERIES[:1], k=3)
    assert method.kind == "knn" and method.stale and len(hits[0]) == 3
    assert "STALE: 1 file(s) added" in method.detail

    done = index_cli(None)
    assert done.returncode == 0 and "updated" in done.stdout, done.stdout + done.stderr
    latest = read_current(str(root), "image")
    assert latest.info["vectors"] == 18
    # The half-written builds are gone; the current one and its parent remain.
    versions = sorted(p.name for p in (root / KNN_DIR / "image").glob("v-*"))
    assert versions == sorted([first.version, latest.version])


def test_cli_index_inspect_and_search_report_the_index_and_staleness(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "emb"
    partition(tmp_path, "2026-11-01", seed=1)
    assert cli(["inspect", str(root)]) == 0
    assert "kNN:      none" in capsys.readouterr().out

    assert cli(["index", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"{root}/_knn/image: built Flat, 12 vectors" in out
    assert f"{root}/_knn/text: built Flat, 12 vectors" in out

    assert cli(["search", "a red circle", "--table", str(root), "-k", "2"]) == 0
    captured = capsys.readouterr()
    assert "search: kNN index _knn/image (Flat, 12 vectors" in captured.out
    assert "; current" in captured.out and "stale" not in captured.err
    assert "date=2026-11-01/" in captured.out  # hits name their partition

    partition(tmp_path, "2026-11-02", shards=1, seed=2)
    assert cli(["inspect", str(root)]) == 0  # the table is consistent; the index lags
    out = capsys.readouterr().out
    assert "_knn/image: Flat, 12 vectors of 2 file(s)" in out
    assert "STALE: 1 file(s) added since it was built" in out
    assert "result:   consistent (kNN index stale)" in out
    assert cli(["inspect", str(root), "--fail-stale"]) == 4
    capsys.readouterr()
    assert cli(["search", "a red circle", "--table", str(root)]) == 0
    captured = capsys.readouterr()
    assert "STALE" in captured.out and "the kNN index is stale" in captured.err


def test_a_table_without_captions_gets_an_image_index_only(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_webdataset(src, shards=1, per_shard=6, seed=5, size=32)
    dest = tmp_path / "emb"
    config = build_config(
        {
            "source": {"url": str(src), "caption_ext": None},  # an image-only dataset
            "dest": str(dest),
            "model": "tiny",
            "runtime": {"device": "cpu", "batch_size": 8},
        }
    )
    run_plan(plan_shards(config), "test")
    reports = {r.name: r for r in build_indexes(str(dest))}
    assert reports["image"].mode == "built" and reports["image"].vectors == 6
    assert reports["text"].mode == "skipped"
    assert "no row has a text_embedding vector" in reports["text"].reasons[0]
    assert list_indexes(str(dest)) == ["image"]
    with pytest.raises(NoVectorsError):  # asked for by name, it is an error
        build_indexes(str(dest), ["text"])


def test_partition_root_of_a_destination() -> None:
    assert partition_root("s3://b/emb/vit/date=2026-11-30/") == "s3://b/emb/vit"
    assert partition_root("s3://b/emb/year=2026/month=11") == "s3://b/emb"
    assert partition_root("s3://b/emb/") == "s3://b/emb"
    assert partition_root("s3://date=x/") == "s3://date=x"  # never up to the scheme
    assert partition_root("/data/a=b") == "/data"


def _shard_reads(exchanges: list) -> dict[str, list[int]]:
    """Bytes of each GET of a shard file (not bookkeeping), by file name."""
    reads: dict[str, list[int]] = {}
    for ex in exchanges:
        path = unquote(urlsplit(ex.target).path)
        if ex.method == "GET" and "/_" not in path and path.endswith(".parquet"):
            reads.setdefault(path.rsplit("/", 1)[-1], []).append(ex.received)
    return reads


def test_building_on_s3_costs_the_same_per_file_at_two_table_sizes(
    s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    """One pass over the files (they fit in memory), a fixed number of ranged reads per
    file, the same requests and bytes per file at 4 and 12 files."""
    per_file: dict[int, tuple[float, float]] = {}
    proxy = FaultProxy(s3_endpoint).start()
    try:
        for n in (4, 12):
            src = tmp_path / f"src{n}"
            write_webdataset(src, shards=n, per_shard=8, seed=n, size=32)
            src_url = upload_dir(src, s3_bucket, f"src{n}", s3_endpoint)
            dest = f"s3://{s3_bucket}/emb{n}/date=2026-11-01/"
            run_plan(plan_shards(tiny_s3_config(src_url, dest, s3_endpoint)), "t")
            proxy.clear_exchanges()
            report = build_index(partition_root(dest), "image", storage=_via(proxy))
            assert (report.mode, report.vectors) == ("built", 8 * n)
            exchanges = proxy.recorded()
            reads = _shard_reads(exchanges)
            assert len(reads) == n
            # Footer and column chunks, once; the first and last file's footer again
            # for the model they recorded.
            assert all(len(r) <= 4 for r in reads.values()), reads
            per_file[n] = (len(exchanges) / n, sum(ex.sent + ex.received for ex in exchanges) / n)
    finally:
        proxy.stop()
    small, big = per_file[4], per_file[12]
    assert big[0] <= small[0] and big[1] <= 1.05 * small[1], per_file


def test_a_build_past_its_memory_bound_reads_each_file_twice_for_the_same_index(
    s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    """Vectors that do not fit in ``hold_bytes`` are read a second time to be added (two
    passes, memory bounded): twice the GETs of each file, and the very same index."""
    src = tmp_path / "src"
    write_webdataset(src, shards=3, per_shard=8, seed=21, size=32)
    src_url = upload_dir(src, s3_bucket, "two-pass-src", s3_endpoint)
    root = f"s3://{s3_bucket}/two-pass"
    run_plan(plan_shards(tiny_s3_config(src_url, root, s3_endpoint)), "t")
    builds = {}
    proxy = FaultProxy(s3_endpoint).start()
    try:
        for label, hold in (("one pass", 1 << 30), ("two passes", 1)):
            proxy.clear_exchanges()
            settings = IndexSettings(factory="Flat", rebuild=True, hold_bytes=hold)
            report = build_index(root, "image", settings, storage=_via(proxy))
            reads = _shard_reads(proxy.recorded())
            index = open_index(root, "image", StorageOptions(endpoint_url=s3_endpoint))
            vectors = index.index.index.reconstruct_n(0, index.index.ntotal)
            mapped = faiss.vector_to_array(index.index.id_map)
            builds[label] = (
                report.vectors,
                len(reads),
                {n: len(r) for n, r in reads.items()},
                mapped,
                vectors,
            )
    finally:
        proxy.stop()
    one, two = builds["one pass"], builds["two passes"]
    assert one[0] == two[0] == 24 and one[1] == two[1] == 3
    # Each file's footer and columns once more in the second pass (the first and last
    # file's footer are also read for the model they recorded).
    for name, count in two[2].items():
        assert count >= one[2][name] + 1, (one[2], two[2])
    np.testing.assert_array_equal(one[3], two[3])  # the same ids, in the same order
    np.testing.assert_array_equal(one[4], two[4])  # and the same vectors


def test_building_reads_the_key_and_vector_columns_not_whole_files(
    s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    """A shard file of 1,000 rows: the build fetches its footer, key and image vectors
    only (fsspec's default read-ahead would fetch the whole file)."""
    src = tmp_path / "src"
    write_webdataset(src, shards=1, per_shard=1000, seed=3, size=32)
    src_url = upload_dir(src, s3_bucket, "big-src", s3_endpoint)
    dest = f"s3://{s3_bucket}/big-emb/"
    run_plan(plan_shards(tiny_s3_config(src_url, dest, s3_endpoint, batch_size=256)), "t")
    fs, path = get_fs(dest + "00000.parquet", StorageOptions(endpoint_url=s3_endpoint))
    size = fs.size(path)
    proxy = FaultProxy(s3_endpoint).start()
    try:
        report = build_index(dest, "image", storage=_via(proxy))
        reads = _shard_reads(proxy.recorded())
    finally:
        proxy.stop()
    assert report.vectors == 1000
    meta = pq.read_metadata(fs.open(path, "rb"))
    wanted = sum(
        meta.row_group(g).column(c).total_compressed_size
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
        if meta.row_group(g).column(c).path_in_schema.split(".")[0] in ("key", "image_embedding")
    )
    got = reads["00000.parquet"]
    # pyarrow's footer read (the last 64 KiB) and the two columns' chunks, nothing else:
    # not the captions, the text vectors or the other columns.
    assert sum(got) <= 64 * 1024 + wanted + 1024 * len(got), (got, wanted, size)
    assert sum(got) < 0.6 * size, (got, size)


def _via(proxy: FaultProxy) -> StorageOptions:
    return StorageOptions(endpoint_url=proxy.url)


def test_embed_runs_announce_their_root_and_the_flow_builds_under_its_limit(
    prefect_harness, tmp_path: Path
) -> None:
    from clipbatch_flows.embed import embed_dataset
    from clipbatch_flows.knn import build_index_flow, root_limit_name
    from prefect import get_client

    from tests import prefect_readback

    src = tmp_path / "src"
    write_webdataset(src, shards=2, per_shard=4, seed=9, size=32)
    root = tmp_path / "emb"
    config = build_config(
        {
            "source": str(src),
            "dest": str(root / "date=2026-11-01"),
            "model": "tiny",
            "runtime": {"device": "cpu", "batch_size": 8, "task_retries": 0},
        }
    )
    announced = []
    for _ in range(2):  # the first run writes, the rerun skips every shard
        state = embed_dataset(config=config, return_state=True)
        run_id = str(state.state_details.flow_run_id)
        (event,) = prefect_readback.events(run_id, ["clipbatch.run."], expect=1)
        announced.append(event)
    first, rerun = announced
    assert first.event == "clipbatch.run.completed"
    assert first.resource.id == f"clipbatch.table.{root}"  # the partition's parent
    assert first.resource["clipbatch.changed"] == "true"
    assert rerun.resource["clipbatch.changed"] == "false"  # the trigger ignores it
    assert first.payload["root"] == str(root)
    assert first.payload["dest"] == str(root / "date=2026-11-01")
    assert first.payload["shards_committed"] == 2

    # What the deployment's trigger passes: the root and the storage from the payload.
    state = build_index_flow(
        root=first.payload["root"], storage=first.payload["storage"], return_state=True
    )
    reports = state.result()
    assert [(r["name"], r["mode"], r["vectors"]) for r in reports] == [
        ("image", "built", 8),
        ("text", "built", 8),
    ]
    assert build_index_flow(root=str(root))[0]["mode"] == "current"
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(root_limit_name(str(root)))
    assert (limit.limit, limit.active_slots) == (1, 0)  # one build per root; released
    arts = {a.key: a for a in prefect_readback.artifacts(str(state.state_details.flow_run_id))}
    assert "| _knn/image | built | 8 |" in arts["clipbatch-knn-index"].data


@pytest.mark.parametrize(
    "factory", [["--factory", "Flat"], ["--factory", "IVF4,Flat", "--nprobe", "4"]]
)
def test_dedup_writes_every_near_duplicate_pair_once(tmp_path: Path, factory: list[str]) -> None:
    import itertools
    import shutil

    root = tmp_path / "emb"
    partition(tmp_path, "2026-11-01", seed=1)
    # The same images again the next night: each is an exact duplicate of one before.
    shutil.copytree(tmp_path / "src" / "2026-11-01", tmp_path / "src" / "2026-11-02")
    embed(tmp_path / "src" / "2026-11-02", root / "date=2026-11-02")
    assert cli(["index", str(root), "--name", "image", *factory]) == 0
    threshold = 0.97
    assert cli(["dedup", str(root), "--threshold", str(threshold)]) == 0
    pairs = pq.read_table(root / "_knn" / "image" / f"dedup-{threshold:g}.parquet")
    got = {
        tuple(sorted([(r["table_a"], r["key_a"]), (r["table_b"], r["key_b"])]))
        for r in pairs.to_pylist()
    }
    assert len(got) == pairs.num_rows  # each pair once
    # Brute force over the table's own vectors: every pair at or above the threshold.
    rows = []
    for table in open_tables(str(root)):
        rel = table.dest.rstrip("/").rsplit("/", 1)[-1]
        for file in table.files:
            data = table.read(file, ["key", "image_embedding"])
            mat, valid = embedding_matrix(data.column("image_embedding"))
            keys = data.column("key").to_pylist()
            rows += [
                ((rel, keys[i]), normalize_rows(mat[i : i + 1])[0]) for i in np.flatnonzero(valid)
            ]
    want, borderline = set(), set()
    for (ka, va), (kb, vb) in itertools.combinations(rows, 2):
        cos = float(va @ vb)
        pair = tuple(sorted([ka, kb]))
        if abs(cos - threshold) < 1e-4:
            borderline.add(pair)
        elif cos >= threshold:
            want.add(pair)
    assert want - got == set() and got - want - borderline == set()
    # The copied night: each of its 12 rows pairs with its original, at cosine 1.
    same = {
        (("date=2026-11-01", k), ("date=2026-11-02", k))
        for (t, k), _ in rows
        if t == "date=2026-11-01"
    }
    assert same <= got
    exact = pairs.filter(pc.greater(pairs.column("cosine"), 0.9999))
    assert exact.num_rows >= 12
    assert pairs.column("cosine").to_pylist() == sorted(
        pairs.column("cosine").to_pylist(), reverse=True
    )


def test_a_new_model_rebuilds_the_index_and_mixed_models_are_refused(tmp_path: Path) -> None:
    from clipbatch.knn.vectors import ModelChangedError
    from tests import model_fixtures as mf

    root = tmp_path / "emb"
    src = tmp_path / "src"
    write_webdataset(src, shards=2, per_shard=4, seed=4, size=32)
    embed(src, root / "date=2026-11-01")
    embed(src, root / "date=2026-11-02")
    first = build_index(str(root), "image")
    assert first.mode == "built"

    # One night re-embedded with another model: one index cannot hold both.
    other = str(mf.write_openai_checkpoint(tmp_path / "other.pt", seed=3))

    def embed_with(model: str, dest: Path) -> None:
        config = build_config(
            {
                "source": str(src),
                "sink": {"url": str(dest)},
                "model": model,
                "runtime": {"device": "cpu", "batch_size": 8},
            }
        )
        run_plan(plan_shards(config), "test")

    embed_with(other, root / "date=2026-11-02")  # a new fingerprint: rewritten
    with pytest.raises(ModelChangedError, match="index each model's tables"):
        build_index(str(root), "image")
    assert read_current(str(root), "image").version == first.version  # untouched

    # Every night on the new model: the update sees it and rebuilds from scratch.
    embed_with(other, root / "date=2026-11-01")
    report = build_index(str(root), "image")
    assert report.mode == "built" and report.reasons == ["the table's model changed"]
    info = read_current(str(root), "image").info
    assert info["model"]["name"] == other and info["vectors"] == 16
