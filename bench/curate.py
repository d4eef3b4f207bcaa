"""Curated-shard copy throughput from S3 (``python -m bench.curate``): what
``curate_root`` ships per second, against a plain copy of the same bytes. Figures, not
tests.

Setup, all on moto's S3 server (its own process on 127.0.0.1, so its CPU is not the
bench's GIL's): source WebDataset shards (img2dataset layout; JPEGs of 256 to 512 px,
20 to 60 KB, each sample's bytes unique), and a table embedded from them with the
built-in ``tiny`` model on CPU (not measured).

Measured, interleaved (curate, plain, curate, plain, ...), medians reported:

- **curate**: ``curate_root`` with a spec that keeps every row (``min_similarity:
  null``; no heads, no ``unique``: no judgement is computed), writing curated shards to
  an S3 output. Throughput: image bytes shipped / (read + write + stage + publish s),
  the copy stages of ``report.seconds``; and image bytes / the whole call's wall time.
- **plain**: the same image bytes (per source shard, its images concatenated into one
  object beforehand) copied the straightforward way: per object one GET, one PUT to
  another key, on as many threads as ``RowImages.read_many`` uses (8), through the same
  s3fs clients clipbatch uses.

Requests: one further run of each, untimed, through a counting proxy
(``tests/faultproxy.py``). CPU: user + system seconds of the bench process and of the
moto process per run (two cores: their sum over the wall time says how busy the machine
was with the measured work).

Writes bench/curate.json and the curate section of bench/RESULTS.md. The source JPEGs
are made once under the bench dir (``$CLIPBATCH_BENCH_DIR``) and reused.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import struct
import subprocess
import sys
import tarfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from bench.report import cpu_model, free_port, loadavg, log, write_figures, write_section

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUCKET = "bench-curate"
THREADS = 8  # RowImages.read_many's default
TARGET = 0.8


# -- the machine ------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- moto, in a process of its own ------------------------------------------------------------
def child_moto(port: int) -> int:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        while True:
            time.sleep(3600)
    finally:
        server.stop()


class Moto:
    def __init__(self) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "bench.curate", "--child-moto", str(self.port)]
        self.proc = subprocess.Popen(cmd, cwd=REPO)
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(self.url, timeout=2)
                return
            except httpx.HTTPError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto's server did not start") from None
                time.sleep(0.2)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# -- the source ---------------------------------------------------------------------------------
def with_comment(jpeg: bytes, text: str) -> bytes:
    """The JPEG with a COM segment after its SOI: the same picture, bytes of its own."""
    body = text.encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def source_shards(shards: int, per_shard: int, pool: int, seed: int) -> Path:
    """img2dataset-style tars under the bench dir, made once: ``pool`` pictures of 256 to
    512 px (random sides, JPEG quality 90), each sample one of them with its key in a
    JPEG comment (so every image's bytes and sha256 are its own)."""
    from bench.common import work_dir
    from clipbatch.synthetic import jpeg_bytes, random_spec, render

    path = work_dir() / f"curate-src-{shards}x{per_shard}-p{pool}-s{seed}"
    done = path / "_done"
    if done.is_file():
        return path
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pictures = []
    log(f"rendering {pool} source pictures (once) ...")
    for _ in range(pool):
        spec = random_spec(rng)
        side = rng.randint(256, 512)
        img = render(spec, side, rng)
        w, h = side, rng.randint(256, 512)
        pictures.append((spec, w, h, jpeg_bytes(img.resize((w, h)))))
    for s in range(shards):
        with tarfile.open(path / f"{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s * 10_000 + i:09d}"
                spec, w, h, jpeg = pictures[rng.randrange(pool)]
                meta = {"key": key, "caption": spec.caption(), "width": w, "height": h,
                        "url": f"https://example.invalid/{key}.jpg"}  # fmt: skip
                for name, data in (
                    (f"{key}.jpg", with_comment(jpeg, f"clipbatch bench {key}")),
                    (f"{key}.txt", spec.caption().encode()),
                    (f"{key}.json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    done.write_text("ok")
    return path


def images_of(tar_path: Path) -> list[bytes]:
    with tarfile.open(tar_path) as tar:
        return [tar.extractfile(m).read() for m in tar if m.name.endswith(".jpg")]  # type: ignore[union-attr]


# -- S3 helpers -----------------------------------------------------------------------------------
def client(endpoint: str) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def remove_prefix(endpoint: str, prefix: str) -> None:
    s3 = client(endpoint)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})


def setup(args: argparse.Namespace, endpoint: str) -> dict[str, Any]:
    """Sources, their plain-copy objects and the embedded table, on S3."""
    from clipbatch.config import build_config
    from clipbatch.pipeline.worker import run_plan
    from clipbatch.plan.planner import plan_shards

    local = source_shards(args.shards, args.per_shard, args.pool, args.seed)
    s3 = client(endpoint)
    s3.create_bucket(Bucket=BUCKET)
    image_bytes, tar_bytes, sizes = 0, 0, []
    for s in range(args.shards):
        tar = local / f"{s:05d}.tar"
        s3.upload_file(str(tar), BUCKET, f"src/{tar.name}")
        images = images_of(tar)
        sizes += [len(i) for i in images]
        plain = b"".join(images)
        s3.put_object(Bucket=BUCKET, Key=f"plain-src/{s:05d}.bin", Body=plain)
        image_bytes += len(plain)
        tar_bytes += tar.stat().st_size
    log(f"embedding {len(sizes)} rows (tiny, CPU) ...")
    t0 = time.perf_counter()
    storage = {"endpoint_url": endpoint}
    config = build_config({
        "source": {"url": f"s3://{BUCKET}/src", "storage": storage},
        "sink": {"url": f"s3://{BUCKET}/emb/date=2026-11-01", "storage": storage},
        "model": {"name": "tiny"},
        "runtime": {"device": "cpu", "batch_size": args.embed_batch},
    })  # fmt: skip
    run_plan(plan_shards(config), "bench-curate")
    embed_s = time.perf_counter() - t0
    sizes.sort()
    return {
        "shards": args.shards,
        "per_shard": args.per_shard,
        "images": len(sizes),
        "image_bytes": image_bytes,
        "tar_bytes": tar_bytes,
        "image_kb": {
            "min": round(sizes[0] / 1e3, 1),
            "median": round(sizes[len(sizes) // 2] / 1e3, 1),
            "mean": round(image_bytes / len(sizes) / 1e3, 1),
            "max": round(sizes[-1] / 1e3, 1),
        },
        "embed_s": round(embed_s, 1),
    }


# -- the two things compared ----------------------------------------------------------------
def curate_once(args: argparse.Namespace, endpoint: str, tag: str) -> dict[str, Any]:
    from clipbatch.config import StorageOptions
    from clipbatch.curate.run import curate_root

    storage = StorageOptions(endpoint_url=endpoint)
    spec = {
        "name": f"bench-{tag}",
        "rules": {"min_similarity": None},
        "output": {"url": f"s3://{BUCKET}/curated-{tag}", "rows_per_shard": args.rows_per_shard,
                   "storage": {"endpoint_url": endpoint}},
    }  # fmt: skip
    t0 = time.perf_counter()
    report = curate_root(f"s3://{BUCKET}/emb", spec, storage)
    wall = time.perf_counter() - t0
    assert report.dropped == 0 and report.kept == args.shards * args.per_shard, report
    sec = report.seconds
    copy_s = sum(sec.get(k, 0.0) for k in ("read", "write", "stage", "publish"))
    return {
        "wall_s": wall,
        "copy_s": copy_s,
        "seconds": dict(sec),
        "image_bytes": report.image_bytes,
        "shards_out": len(report.shards),
    }


def plain_once(args: argparse.Namespace, endpoint: str, tag: str) -> dict[str, Any]:
    """Per source shard: one GET of its images' bytes, one PUT of them; 8 threads."""
    from clipbatch.config import StorageOptions
    from clipbatch.io.storage import get_fs

    storage = StorageOptions(endpoint_url=endpoint)
    fs, _ = get_fs(f"s3://{BUCKET}/plain-src", storage)

    def copy(s: int) -> int:
        data = fs.cat_file(f"{BUCKET}/plain-src/{s:05d}.bin")
        fs.pipe_file(f"{BUCKET}/plain-{tag}/{s:05d}.bin", data)
        return len(data)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        moved = sum(pool.map(copy, range(args.shards)))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "copy_s": wall, "image_bytes": moved}


def staged_once(args: argparse.Namespace, endpoint: str, tag: str) -> dict[str, Any]:
    """The plain copy under curation's commit protocol on S3: per object one GET, and its
    bytes (through a local file, as curation's shards are built) uploaded as a multipart
    upload to the final key, not completed; then (after all: the commit) each upload
    completed; 8 threads each."""
    import tempfile

    from clipbatch.config import StorageOptions
    from clipbatch.io import multipart
    from clipbatch.io.storage import get_fs

    storage = StorageOptions(endpoint_url=endpoint)
    fs, _ = get_fs(f"s3://{BUCKET}/plain-src", storage)
    uploads: dict[int, multipart.DeferredUpload] = {}

    def copy(s: int) -> int:
        data = fs.cat_file(f"{BUCKET}/plain-src/{s:05d}.bin")
        local = Path(work) / f"{s:05d}.bin"
        local.write_bytes(data)
        uploads[s] = multipart.upload_deferred(fs, f"{BUCKET}/staged-{tag}/{s:05d}.bin", local)
        local.unlink()
        return len(data)

    def publish(s: int) -> None:
        multipart.complete(fs, f"{BUCKET}/staged-{tag}/{s:05d}.bin", uploads[s])

    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(THREADS) as pool:
            moved = sum(pool.map(copy, range(args.shards)))
            t1 = time.perf_counter()
            list(pool.map(publish, range(args.shards)))
        wall = time.perf_counter() - t0
    return {"wall_s": wall, "copy_s": wall, "image_bytes": moved,
            "seconds": {"copy": round(t1 - t0, 3), "publish": round(wall - (t1 - t0), 3)}}  # fmt: skip


KINDS = {"curate": curate_once, "plain": plain_once, "staged": staged_once}
PREFIX = {"curate": "curated", "plain": "plain", "staged": "staged"}


def measured(kind: str, fn: Any, args: argparse.Namespace, moto: Moto, tag: str) -> dict[str, Any]:
    load = os.getloadavg()[0]
    bench0, moto0 = time.process_time(), moto.cpu()
    out = fn(args, moto.url, tag)
    out["bench_cpu_s"] = time.process_time() - bench0
    out["moto_cpu_s"] = moto.cpu() - moto0
    out["load_1m"] = round(load, 2)
    out["mb_s"] = out["image_bytes"] / 1e6 / out["copy_s"]
    out["wall_mb_s"] = out["image_bytes"] / 1e6 / out["wall_s"]
    remove_prefix(moto.url, f"{PREFIX[kind]}-{tag}/")
    log(
        f"{kind:6s} {tag}: {out['mb_s']:6.1f} MB/s (copy {out['copy_s']:.2f} s, wall "
        f"{out['wall_s']:.2f} s) cpu bench {out['bench_cpu_s']:.1f} s moto "
        f"{out['moto_cpu_s']:.1f} s load {load:.1f} {out.get('seconds', '')}"
    )
    return out


def requests_part(args: argparse.Namespace, moto: Moto) -> dict[str, Any]:
    """One untimed run of each through a counting proxy: requests by kind."""
    sys.path.insert(0, str(REPO))
    from tests.faultproxy import FaultProxy

    proxy = FaultProxy(moto.url).start()
    out: dict[str, Any] = {}
    try:
        for kind, fn in KINDS.items():
            proxy.exchanges.clear()
            fn(args, proxy.url, "counted")
            time.sleep(1)  # the proxy records an exchange once it has forwarded all of it
            counts: Counter[str] = Counter()
            moved = 0
            for e in list(proxy.exchanges):
                path = unquote(urlsplit(e.target).path)
                query = urlsplit(e.target).query
                what = (
                    "source tar" if "/src/" in path and path.endswith(".tar")
                    else "staging" if "/_staging/" in path
                    else "output" if any(f"/{x}-counted/" in path for x in PREFIX.values())
                    else "plain source" if "/plain-src/" in path
                    else "table/selection"
                )  # fmt: skip
                label = f"{e.method} {what}" + (" (multipart)" if "uploadId" in query else "")
                counts[label] += 1
                moved += e.sent + e.received
            out[kind] = {"requests": sum(counts.values()), "by_kind": dict(counts.most_common()),
                         "bytes_on_wire": moved}  # fmt: skip
            remove_prefix(moto.url, f"{PREFIX[kind]}-counted/")
    finally:
        proxy.stop()
    return out


def med(values: list[float]) -> float:
    return float(statistics.median(values))


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "runs": len(runs),
        "mb_s": round(med([r["mb_s"] for r in runs]), 1),
        "wall_mb_s": round(med([r["wall_mb_s"] for r in runs]), 1),
        "copy_s": round(med([r["copy_s"] for r in runs]), 3),
        "wall_s": round(med([r["wall_s"] for r in runs]), 3),
        "bench_cpu_s": round(med([r["bench_cpu_s"] for r in runs]), 2),
        "moto_cpu_s": round(med([r["moto_cpu_s"] for r in runs]), 2),
        "load_1m": round(med([r["load_1m"] for r in runs]), 2),
        "mb_s_all": [round(r["mb_s"], 1) for r in runs],
    }
    if "seconds" in runs[0]:
        stages = sorted({k for r in runs for k in r["seconds"]})
        out["seconds"] = {
            k: round(med([r["seconds"].get(k, 0.0) for r in runs]), 3) for k in stages
        }
        out["shards_out"] = runs[0].get("shards_out")
    return out


# -- the report -------------------------------------------------------------------------------
def markdown(r: dict[str, Any]) -> str:
    m, d, c, p, st = r["machine"], r["data"], r["curate"], r["plain"], r["staged"]
    kb = d["image_kb"]
    lines = [
        f"## Curated-shard copy throughput from S3 ({r['date']}, CPU: {m['cpu']} x{m['cores']})",
        "",
        f"`{r['command']}` ({r['total_s'] / 60:.1f} min); raw figures: bench/curate.json. "
        f"Load average (1, 5, 15 min) at start {' '.join(map(str, m['load_at_start']))}, at "
        f"end {' '.join(map(str, m['load_at_end']))}, on {m['cores']} cores shared with other "
        "jobs: the three copies are measured interleaved (curate, plain, staged, curate, ...) "
        f"after {r['args']['warmup']} unmeasured round, and medians reported.",
        "",
        f"Source: {d['shards']} WebDataset shards x {d['per_shard']} samples on moto's S3 "
        f"server (its own process on 127.0.0.1): {d['images']} JPEGs of 256 to 512 px, "
        f"{kb['min']} to {kb['max']} KB (median {kb['median']} KB), "
        f"{d['image_bytes'] / 1e6:.1f} MB of images ({d['tar_bytes'] / 1e6:.1f} MB of tars); "
        f"a table embedded from them with `tiny` on CPU, batch size {r['args']['embed_batch']} "
        f"(a row group per batch; {d['embed_s']} s, not measured).",
        "",
        "- *curate*: `curate_root` keeping every row (`min_similarity: null`, no heads, no "
        f"`unique`: no judgement computed), rows_per_shard {r['args']['rows_per_shard']} "
        f"({c['shards_out']} curated shards), output on the same S3. MB/s = image bytes "
        "shipped / (read + write + stage + publish) of `report.seconds` (the time the run "
        "waited on each: reads and uploads overlap the writing), and / the whole call's wall "
        "time (with the decisions, the selection files and the commit).",
        "- *plain*: the same image bytes (each source shard's images, concatenated into one "
        f"object beforehand): per object one GET and one PUT to another key, {THREADS} "
        "threads, the s3fs clients clipbatch uses.",
        "- *staged*: *plain* under curation's commit protocol on S3: the bytes (through a "
        "local file) uploaded as a multipart upload to the final key, not completed; then "
        f"(all uploads done) each completed, {THREADS} threads.",
        "",
        "CPU: user + system seconds of the bench process (the client) and of moto's, per run.",
        "",
        "| copy | runs | MB/s | MB/s (wall) | s | wall s | client CPU s | moto CPU s "
        "| load (1 min) | MB/s, each run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, x in (("curate", c), ("plain", p), ("staged", st)):
        lines.append(
            f"| {name} | {x['runs']} | {x['mb_s']} | {x['wall_mb_s']} | {x['copy_s']} | "
            f"{x['wall_s']} | {x['bench_cpu_s']} | {x['moto_cpu_s']} | {x['load_1m']} | "
            f"{', '.join(map(str, x['mb_s_all']))} |"
        )
    ratio = r["ratio"]
    verdict = "meets" if ratio >= TARGET else "misses"
    lines += [
        "",
        f"**curate / plain: {ratio:.2f}** ({r['ratio_wall']:.2f} on the whole call's wall "
        f"time; per interleaved pair: {', '.join(map(str, r['ratio_per_pair']))}): {verdict} "
        f"the target of {TARGET}. Without the publish step (read + write + stage only): "
        f"{r['curate_before_publish_mb_s']} MB/s, {r['ratio_before_publish']:.2f} of plain. "
        f"curate / staged: {r['ratio_to_staged']:.2f}; staged / plain: "
        f"{r['staged_to_plain']:.2f}.",
        "",
        "curate_root's stages (median s): "
        + ", ".join(f"{k} {v}" for k, v in c["seconds"].items())
        + "; staged's: "
        + ", ".join(f"{k} {v}" for k, v in st["seconds"].items())
        + ".",
        "",
    ]
    req = r.get("requests")
    if req:
        lines += ["Requests (one further run of each, untimed, through a counting proxy):", ""]
        for name in KINDS:
            x = req[name]
            kinds = ", ".join(f"{k} {v}" for k, v in x["by_kind"].items())
            lines.append(f"- {name}: {x['requests']} ({kinds})")
        lines.append("")
    if r.get("notes"):
        lines += [r["notes"], ""]
    return "\n".join(lines)


def write_results(r: dict[str, Any]) -> None:
    write_figures("curate", r)
    write_section("curate", markdown(r))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=8, help="source shards")
    p.add_argument("--per-shard", type=int, default=500, help="samples per source shard")
    p.add_argument("--pool", type=int, default=240, help="distinct pictures rendered")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument(
        "--embed-batch",
        type=int,
        default=256,
        help="the embedding's batch size (the default's): the table's row groups follow it",
    )
    p.add_argument("--rows-per-shard", type=int, default=1000, help="curated shard size")
    p.add_argument("--runs", type=int, default=5, help="measured runs of each")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured runs of each first")
    p.add_argument("--no-requests", action="store_true", help="skip the counted runs")
    p.add_argument("--quick", action="store_true", help="2 shards x 200, 2 runs")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--child-moto", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_moto:
        return child_moto(args.child_moto)
    if args.quick:
        args.shards, args.per_shard, args.runs, args.pool = 2, 200, 2, 60
    os.environ.update({
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    })  # fmt: skip
    os.environ.pop("AWS_PROFILE", None)
    from clipbatch.settings import apply_process_settings

    apply_process_settings()
    command = "python -m bench.curate" + (" " + " ".join(argv) if argv else "")
    if argv is None:
        command = "python -m bench.curate" + "".join(f" {a}" for a in sys.argv[1:])
    start = time.perf_counter()
    r: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_at_start": loadavg()},
        "command": command,
        "args": {k: v for k, v in vars(args).items() if k != "child_moto"},
    }
    log(f"load at start: {r['machine']['load_at_start']}")
    moto = Moto()
    try:
        r["data"] = setup(args, moto.url)
        log(f"data: {r['data']}")
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
        for i in range(args.warmup + args.runs):
            for kind, fn in KINDS.items():  # interleaved: curate, plain, staged, curate, ...
                tag = f"w{i}" if i < args.warmup else f"r{i - args.warmup}"
                out = measured(kind, fn, args, moto, tag)
                if i >= args.warmup:
                    runs[kind].append(out)
        for kind in KINDS:
            r[kind] = summary(runs[kind])
        c, p, st = r["curate"], r["plain"], r["staged"]
        r["ratio"] = round(c["mb_s"] / p["mb_s"], 3)
        r["ratio_wall"] = round(c["wall_mb_s"] / p["wall_mb_s"], 3)
        r["ratio_per_pair"] = [
            round(x["mb_s"] / y["mb_s"], 3)
            for x, y in zip(runs["curate"], runs["plain"], strict=True)
        ]
        r["ratio_to_staged"] = round(c["mb_s"] / st["mb_s"], 3)
        r["staged_to_plain"] = round(st["mb_s"] / p["mb_s"], 3)
        unpublished = [
            x["image_bytes"] / 1e6 / (x["copy_s"] - x["seconds"].get("publish", 0.0))
            for x in runs["curate"]
        ]
        r["curate_before_publish_mb_s"] = round(med(unpublished), 1)
        r["ratio_before_publish"] = round(r["curate_before_publish_mb_s"] / p["mb_s"], 3)
        if not args.no_requests:
            r["requests"] = requests_part(args, moto)
    finally:
        moto.stop()
    r["total_s"] = round(time.perf_counter() - start, 1)
    r["machine"]["load_at_end"] = loadavg()
    print(markdown(r))
    if not args.no_write:
        write_results(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
