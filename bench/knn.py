"""kNN index figures (``python -m bench.knn``): recall against brute force, build time,
query latency and index size, through the library's own build and search.

The table: 100,000 vectors of 512 dimensions, a mixture of 1,000 clusters (i.i.d.
random vectors would make every approximate index look bad), written as a partition
root of 10 nightly tables of 10 shard files each, float16 as clipbatch writes them,
with 2 % of rows failed (no vector). The queries: 1,000 fresh draws from the same
mixture. The truth: exact inner products over the same normalised float16 vectors.

Also: an incremental update (one more night of 10,000 vectors) against a rebuild, and
recall and latency across ``nprobe``. Figures, not tests. Writes bench/knn.json and the
kNN section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench.common import work_dir
from bench.report import write_figures, write_section
from clipbatch.knn.build import build_index
from clipbatch.knn.policy import IndexSettings, faiss_module
from clipbatch.knn.search import open_index
from clipbatch.knn.store import INDEX_FILE
from clipbatch.sink.schema import encode_metadata
from clipbatch.tables.vectors import embedding_matrix

HERE = Path(__file__).resolve().parent
MODEL = {"name": "bench-random", "checkpoint_sha256": "0" * 64, "embed_dim": 512}


def mixture(rng: np.random.Generator, centers: np.ndarray, n: int, spread: float) -> np.ndarray:
    """``n`` points around random centers; ``spread`` is the noise norm per point."""
    which = rng.integers(0, len(centers), n)
    noise = rng.standard_normal((n, centers.shape[1])).astype(np.float32)
    noise *= spread / np.sqrt(centers.shape[1])
    x = centers[which] + noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_night(
    root: Path, night: int, vectors: np.ndarray, files: int, rng: np.random.Generator
) -> None:
    dest = root / f"date=2026-11-{night + 1:02d}"
    dest.mkdir(parents=True, exist_ok=True)
    dim = vectors.shape[1]
    for f, part in enumerate(np.array_split(vectors, files)):
        n = len(part)
        failed = rng.random(n) < 0.02
        stored = part.astype(np.float16)
        stored[failed] = 0  # rows without a vector: all zeros, as the writer stores them
        emb = pa.FixedSizeListArray.from_arrays(pa.array(stored.ravel()), dim)
        table = pa.table(
            {
                "key": [f"{night:03d}{f:03d}{i:05d}" for i in range(n)],
                "caption": [f"caption {night}/{f}/{i}" for i in range(n)],
                "image_embedding": emb,
            }
        ).replace_schema_metadata(encode_metadata({"model": MODEL}))
        pq.write_table(table, dest / f"{f:05d}.parquet", compression="zstd")


def read_truth_vectors(root: Path) -> tuple[np.ndarray, list[str]]:
    """Every vector of the table as the index reads it: float16 -> float32, normalised."""
    mats, keys = [], []
    for path in sorted(root.glob("date=*/*.parquet")):
        t = pq.read_table(path, columns=["key", "image_embedding"])
        m, valid = embedding_matrix(t.column("image_embedding"))
        m = m[valid]
        mats.append(m / np.linalg.norm(m, axis=1, keepdims=True))
        night = path.parent.name
        keys += [
            f"{night}/{k}" for k, v in zip(t.column("key").to_pylist(), valid, strict=True) if v
        ]
    return np.concatenate(mats), keys


def exact_top(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), 100):
        scores = queries[s : s + 100] @ base.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, 1), axis=1)
        out[s : s + 100] = np.take_along_axis(top, order, 1)
    return out


def recall_at(found: list[list[str]], truth: list[list[str]], k: int) -> float:
    hits = sum(len(set(f[:k]) & set(t[:k])) for f, t in zip(found, truth, strict=True))
    return hits / (k * len(truth))


def search_keys(index: Any, queries: np.ndarray, k: int) -> tuple[list[list[str]], float]:
    start = time.perf_counter()
    found = index.search(queries, k)
    seconds = time.perf_counter() - start
    return [[f"{r['table']}/{r['key']}" for _, r in q] for q in found], seconds


def single_query_ms(index: Any, queries: np.ndarray, k: int, count: int = 200) -> float:
    start = time.perf_counter()
    for q in queries[:count]:
        index.search(q[None, :], k)
    return 1000 * (time.perf_counter() - start) / count


def run(
    vectors: int, nights: int, clusters: int, dim: int, spread: float, update: bool = True
) -> dict[str, Any]:
    faiss = faiss_module()
    rng = np.random.default_rng(0)
    root = work_dir() / "knn" / "emb"
    shutil.rmtree(root.parent, ignore_errors=True)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    per_night = vectors // nights
    for night in range(nights):
        write_night(root, night, mixture(rng, centers, per_night, spread), 10, rng)
    queries = mixture(rng, centers, 1000, spread).astype(np.float32)
    base, keys = read_truth_vectors(root)
    k = 10
    start = time.perf_counter()
    truth_idx = exact_top(base, queries, k)
    brute_ms = 1000 * (time.perf_counter() - start) / len(queries)
    truth = [[keys[i] for i in row] for row in truth_idx]
    # How hard the mixture is: the 10th neighbour's cosine against a random pair's.
    tenth = float(np.mean(np.sum(queries * base[truth_idx[:, -1]], axis=1)))
    pick = rng.integers(0, len(base), (2000, 2))
    random_pair = float(np.mean(np.sum(base[pick[:, 0]] * base[pick[:, 1]], axis=1)))

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    report = build_index(str(root), "image")
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    index = open_index(str(root), "image")
    assert index is not None
    size = (root / "_knn" / "image" / report.version / INDEX_FILE).stat().st_size
    found, seconds = search_keys(index, queries, k)
    result: dict[str, Any] = {
        "vectors": report.vectors,
        "rows": vectors,
        "files": report.files,
        "dim": dim,
        "clusters": clusters,
        "spread": spread,
        "tenth_neighbour_cosine": round(tenth, 3),
        "random_pair_cosine": round(random_pair, 3),
        "factory": report.factory,
        "nprobe": index.nprobe,
        "build_s": report.seconds,
        "build_peak_rss_growth_mib": round(max(0, rss1 - rss0) / 1024, 1),
        "index_mib": round(size / 2**20, 2),
        "raw_float32_mib": round(report.vectors * dim * 4 / 2**20, 2),
        "recall_at_10": round(recall_at(found, truth, k), 4),
        "batch_ms_per_query": round(1000 * seconds / len(queries), 3),
        "single_query_ms": round(single_query_ms(index, queries, k), 3),
        "brute_force_ms_per_query": round(brute_ms, 3),
        "threads": faiss.omp_get_max_threads(),
    }
    sweep = []
    for nprobe in (8, 16, 32, 64, 128):
        idx = open_index(str(root), "image", nprobe=nprobe)
        f, s = search_keys(idx, queries, k)
        sweep.append(
            {
                "nprobe": nprobe,
                "recall_at_10": round(recall_at(f, truth, k), 4),
                "batch_ms_per_query": round(1000 * s / len(queries), 3),
                "single_query_ms": round(single_query_ms(idx, queries, k), 3),
            }
        )
    result["nprobe_sweep"] = sweep

    if not update:
        return result
    # One more night: the incremental update against a rebuild of everything.
    write_night(root, nights, mixture(rng, centers, per_night, spread), 10, rng)
    update = build_index(str(root), "image")
    rebuild = build_index(str(root), "image", IndexSettings(rebuild=True))
    result["update"] = {
        "added": update.added,
        "mode": update.mode,
        "update_s": update.seconds,
        "rebuild_s": rebuild.seconds,
        "vectors_after": update.vectors,
    }
    return result


def markdown(r: dict[str, Any]) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [
        f"## kNN index ({when}, CPU: {os.cpu_count()} cores, FAISS {r['threads']} threads)",
        "",
        f"{r['rows']:,} rows ({r['vectors']:,} with a vector; 2 % failed rows have none) of "
        f"{r['dim']} dimensions, a mixture of {r['clusters']:,} clusters, in "
        f"{r['files']} shard files of float16 vectors; 1,000 fresh queries; truth: exact "
        "inner products. `python -m bench.knn`.",
        "",
        "| index (auto) | nprobe | recall@10 | build s | index MiB | raw f32 MiB "
        "| batch ms/query | single ms/query | brute force ms/query |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['factory']} | {r['nprobe']} | {r['recall_at_10']:.4f} | {r['build_s']:.1f} "
        f"| {r['index_mib']} | {r['raw_float32_mib']} | {r['batch_ms_per_query']} "
        f"| {r['single_query_ms']} | {r['brute_force_ms_per_query']} |",
        "",
        "| nprobe | recall@10 | batch ms/query | single ms/query |",
        "|---:|---:|---:|---:|",
    ]
    for s in r["nprobe_sweep"]:
        lines.append(
            f"| {s['nprobe']} | {s['recall_at_10']:.4f} | {s['batch_ms_per_query']} "
            f"| {s['single_query_ms']} |"
        )
    lines += [
        "",
        "How hard the mixture is decides how good an approximate index looks; at each "
        "noise spread around the cluster centers (default settings, nprobe "
        f"{r['nprobe']}):",
        "",
        "| spread | 10th neighbour cosine | random pair cosine | recall@10 "
        "| nprobe 8 | nprobe 16 | nprobe 128 |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for h in [r, *r.get("harder", [])]:
        by = {x["nprobe"]: x["recall_at_10"] for x in h["nprobe_sweep"]}
        lines.append(
            f"| {h['spread']} | {h['tenth_neighbour_cosine']} | {h['random_pair_cosine']} "
            f"| {h['recall_at_10']:.4f} | {by[8]:.4f} | {by[16]:.4f} | {by[128]:.4f} |"
        )
    u = r["update"]
    lines += [
        "",
        f"One more night: {u['mode']} (+{u['added']:,} vectors) in {u['update_s']:.1f} s, "
        f"against a rebuild of all {u['vectors_after']:,} in {u['rebuild_s']:.1f} s. "
        f"Target recall@10 >= 0.95 at the default settings: {r['recall_at_10']:.4f}, "
        f"**{'met' if r['recall_at_10'] >= 0.95 else 'NOT met'}**.",
    ]
    return "\n".join(lines) + "\n"


def write_results(r: dict[str, Any]) -> None:
    write_figures("knn", r)
    write_section("knn", markdown(r))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vectors", type=int, default=100_000)
    p.add_argument("--nights", type=int, default=10)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument(
        "--spread", type=float, default=1.0, help="noise norm around each center (1: cos 0.71)"
    )
    p.add_argument(
        "--harder", type=float, nargs="*", default=[2.0, 3.0], help="further spreads to try"
    )
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    r = run(args.vectors, args.nights, args.clusters, args.dim, args.spread)
    r["harder"] = [
        run(args.vectors, args.nights, args.clusters, args.dim, spread, update=False)
        for spread in args.harder
    ]
    print(markdown(r))
    if not args.no_write:
        write_results(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
