"""``clipbatch serve`` figures (``python -m bench.serve``): encode throughput with and
without dynamic batching, search latency at 100,000 and 1,000,000 rows, and a row's
image from a tar on S3 with its requests counted. Figures, not tests.

Every HTTP figure is a real server (``create_app`` under uvicorn, the way ``clipbatch
serve`` runs it, in a process of its own on 127.0.0.1) and real clients (httpx; asyncio
for concurrent load, sequential for latency). The server process adds one route of its
own, ``/_bench/stats``: its batchers' :class:`~clipbatch.serve.batching.BatchStats`, its
start-up time and its row-image request counter.

1. **Encode.** ``/api/encode/text`` (one caption per request) and ``/api/encode/image``
   (one JPEG per request) with 1 and 32 concurrent clients, for a fixed time after a
   warm-up; dynamic batching (max_batch 64, max_wait_ms 5) against one forward pass per
   request (max_batch 1, max_wait_ms 0), on the built-in ``tiny`` model and on a random
   ViT-B/32 (each serves a real table the pipeline wrote from a few synthetic images).
2. **Search.** Synthetic tables in clipbatch's schema (clustered, L2-normalised float16
   vectors; 2 % failed rows without one) at 100,000 and 1,000,000 rows, indexed by
   ``build_index`` (auto: IVF). (a) dim 64 under the tiny model's own file metadata, so
   text queries are encoded for real: ``/api/search`` with the index and brute force,
   ``encode_ms``, ``search_ms`` and end-to-end latency, start-up time and RSS; (b) dim
   512 (ViT-B/32's): :class:`~clipbatch.serve.search.RootSearch` driven directly with
   query vectors from the same mixture (no HTTP, no model).
3. **Row images from S3.** A tar of 10,000 samples on moto's S3 server, embedded with the
   tiny model to S3; the server reads it through a counting proxy
   (``tests/faultproxy.py``). The first image of the shard, later ones, thumbnails; then
   the same table without ``_members/`` (the fallback: a scan of the tar).

Writes bench/serve.json and the serve section of bench/RESULTS.md. Synthetic inputs are
kept under the bench dir (``$CLIPBATCH_BENCH_DIR``) and reused by a rerun (``--fresh``
makes them again).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.report import cpu_model, free_port, log, wait_for_quiet, write_figures, write_section

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CLIENTS = (1, 32)
BATCHED = {"max_batch": 64, "max_wait_ms": 5.0}
SINGLE = {"max_batch": 1, "max_wait_ms": 0.0}
NO_WAIT = {"max_batch": 64, "max_wait_ms": 0.0}
SPREAD = 1.0  # noise norm around each cluster center, as bench/knn.py
CLUSTERS = 1000
ROWS_PER_FILE = 10_000
FAILED = 0.02
RANDOM_MODEL = {"name": "bench-random-512", "checkpoint_sha256": "0" * 64, "embed_dim": 512}


# -- the machine ------------------------------------------------------------------------
def proc_status(pid: int) -> dict[str, float]:
    """RSS and peak RSS (MiB), and CPU seconds (user + system, all threads) of ``pid``."""
    out: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    out["cpu_s"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return {"rss_mib": out["VmRSS"], "peak_rss_mib": out["VmHWM"], "cpu_s": out["cpu_s"]}


def pct(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def dist(values: list[float]) -> dict[str, Any]:
    import numpy as np

    return {
        "n": len(values),
        "p50": round(pct(values, 50), 3),
        "p99": round(pct(values, 99), 3),
        "mean": round(float(np.mean(values)), 3) if values else None,
        "max": round(max(values), 3) if values else None,
    }


# -- the server, in a process of its own ---------------------------------------------------
def child_server(args: argparse.Namespace) -> int:
    """``create_app`` under uvicorn, as ``clipbatch serve`` runs it, plus /_bench/stats."""
    t0 = time.perf_counter()
    from clipbatch.settings import apply_process_settings

    apply_process_settings()
    import uvicorn

    from clipbatch.config import StorageOptions
    from clipbatch.serve.app import create_app
    from clipbatch.serve.settings import ServeSettings

    imported = time.perf_counter() - t0
    storage = StorageOptions(endpoint_url=args.endpoint) if args.endpoint else StorageOptions()
    settings = ServeSettings(
        root=args.root,
        storage=storage,
        port=args.port,
        use_index=not args.brute_force,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
    )
    app = create_app(settings)
    loaded = time.perf_counter() - t0 - imported
    state = app.state.server

    async def stats() -> dict[str, Any]:
        import importlib.util

        return {
            "loop": type(asyncio.get_running_loop()).__module__,
            "httptools": not args.plain_http and importlib.util.find_spec("httptools") is not None,
            "texts": vars(state.texts.stats),
            "images": vars(state.images.stats),
            "row_image_requests": state.image_service.images.requests,
            "cpu_s": time.process_time(),
            "import_s": round(imported, 3),
            "load_s": round(loaded, 3),
            "rows": len(state.search.catalog),
            "method": state.search.method().detail,
        }

    app.add_api_route("/_bench/stats", stats, methods=["GET"])
    # As `clipbatch serve`: uvicorn picks httptools and uvloop (the serve extra's) when
    # present; --plain-http: its pure-Python parser (h11) and asyncio's own loop.
    plain = {"http": "h11", "loop": "asyncio"} if args.plain_http else {}
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", **plain)
    return 0


class Server:
    """A child process serving ``root``; ``startup_s``: from spawn to /health answering."""

    def __init__(
        self,
        root: str,
        max_batch: int = 64,
        max_wait_ms: float = 5.0,
        brute_force: bool = False,
        endpoint: str | None = None,
        log_name: str = "server",
        extra_path: str | None = None,
        plain_http: bool = False,
    ) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "bench.serve", "--child-server", "--root", root]
        cmd += ["--port", str(self.port), "--max-batch", str(max_batch)]
        cmd += ["--max-wait-ms", str(max_wait_ms)]
        if brute_force:
            cmd.append("--brute-force")
        if plain_http:
            cmd.append("--plain-http")
        if endpoint:
            cmd += ["--endpoint", endpoint]
        from bench.common import work_dir

        self.log_path = work_dir() / "serve" / f"{log_name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [extra_path, str(REPO)]))}
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._log, stderr=self._log)
        deadline = start + 600
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.perf_counter() > deadline:
                raise RuntimeError("server did not start in 600 s")
            time.sleep(0.05)
        self.startup_s = time.perf_counter() - start

    def stats(self) -> dict[str, Any]:
        import httpx

        return httpx.get(f"{self.url}/_bench/stats", timeout=60).json()

    def status(self) -> dict[str, float]:
        return proc_status(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@contextmanager
def serving(root: str, **kwargs: Any) -> Iterator[Server]:
    server = Server(root, **kwargs)
    try:
        yield server
    finally:
        server.stop()


# -- 1. encode throughput -----------------------------------------------------------------
def captions(n: int, seed: int = 5) -> list[str]:
    from clipbatch.synthetic import random_spec

    rng = random.Random(seed)
    return [random_spec(rng).caption() for _ in range(n)]


def real_table(name: str, model: str, images: int = 16) -> str:
    """A table the pipeline itself wrote with ``model`` (a few synthetic 64 px images)."""
    from bench.common import run_pipeline, work_dir
    from clipbatch.synthetic import write_webdataset

    base = work_dir() / "serve" / name
    dest = base / "emb"
    if (dest / "00000.parquet").is_file():
        return str(dest)
    shutil.rmtree(base, ignore_errors=True)
    write_webdataset(base / "wds", shards=1, per_shard=images, seed=3, size=64)
    run_pipeline(
        {
            "source": {"url": str(base / "wds")},
            "sink": {"url": str(dest)},
            "model": {"name": model},
            "runtime": {"device": "cpu", "batch_size": 8},
        }
    )
    return str(dest)


class Connection:
    """One keep-alive HTTP/1.1 connection, asyncio streams only: a client that costs the
    shared CPU far less per request than httpx (about 3 ms of it per request on this
    machine), so the load measures the server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: str | None = None
    ) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        if content_type:
            head += f"Content-Type: {content_type}\r\n"
        self.writer.write(head.encode() + b"\r\n" + body)
        answer = await self.reader.readuntil(b"\r\n\r\n")
        status = int(answer[9:12])
        length = None
        for line in answer.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            raise RuntimeError(f"no content-length in {answer!r}")
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


Request = tuple[str, str, bytes, str | None]  # method, path, body, content type
JSON = "application/json"


async def load(
    port: int,
    make: Callable[[int], Request],
    clients: int,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    """``clients`` connections, each sending ``make(n)`` and the next when answered. The
    warm-up lasts ``warmup`` s and until ``clients`` requests are answered; the window
    then ``duration`` s and until ``2 x clients`` more are (a pass of 32 ViT-B/32 images
    takes seconds on a CPU), at most ``10 x duration``. Returns the requests completed in
    the window, their latencies, and the server's stats at both ends of it."""
    t0 = time.perf_counter()
    done: list[tuple[float, float]] = []
    snaps: dict[str, Any] = {}
    first: list[bytes] = []
    stop = asyncio.Event()

    async def worker(i: int) -> None:
        conn = Connection(port)
        n = i
        try:
            while not stop.is_set():
                s = time.perf_counter()
                status, body = await conn.request(*make(n))
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
                done.append((s, time.perf_counter()))
                if not first:
                    first.append(body)
                n += clients
        finally:
            conn.close()

    async def snap(name: str) -> None:
        conn = Connection(port)
        _, body = await conn.request("GET", "/_bench/stats")
        conn.close()
        snaps[name] = {
            "t": time.perf_counter(),
            "stats": json.loads(body),
            "cpu": time.process_time(),
        }

    async def control() -> None:
        try:
            while time.perf_counter() < t0 + warmup or len(done) < clients:
                if time.perf_counter() > t0 + 600:
                    raise RuntimeError(f"warm-up: {len(done)} of {clients} answered in 600 s")
                await asyncio.sleep(0.01)
            await snap("b")
            begin, counted = snaps["b"]["t"], len(done)
            while time.perf_counter() < begin + duration or len(done) - counted < 2 * clients:
                if time.perf_counter() > begin + 10 * duration:
                    break
                await asyncio.sleep(0.01)
            await snap("e")
        finally:
            stop.set()

    await asyncio.gather(*(worker(i) for i in range(clients)), control())
    window = snaps["e"]["t"] - snaps["b"]["t"]
    inside = [(s, e) for s, e in done if snaps["b"]["t"] <= e <= snaps["e"]["t"]]
    return {
        "requests": len(inside),
        "seconds": window,
        "latencies_ms": [1000 * (e - s) for s, e in inside],
        "stats_begin": snaps["b"]["stats"],
        "stats_end": snaps["e"]["stats"],
        "client_cpu_s": snaps["e"]["cpu"] - snaps["b"]["cpu"],
        "first_body": first[0] if first else b"",
    }


def multipart(name: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
            f'filename="{filename}"\r\nContent-Type: image/jpeg\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def encode_runs(
    label: str,
    root: str,
    modes: dict[str, dict[str, Any]],
    warmup: float,
    duration: float,
    ceiling: bool = False,
    extra_path: str | None = None,
    kinds: tuple[str, ...] = ("text", "image"),
    plain_http: bool = False,
) -> list[dict[str, Any]]:
    from bench.common import jpegs

    texts = captions(256)
    text_bodies = [json.dumps({"texts": [t]}).encode() for t in texts]
    px = 64 if label.startswith("tiny") else 224
    image_bodies = [
        multipart("files", f"{i}.jpg", d) for i, d in enumerate(jpegs(32, px, px, seed=9))
    ]
    rows = []
    for mode, settings in modes.items():
        name = f"encode-{label.replace('/', '')}-{mode}"
        with serving(
            root, log_name=name, extra_path=extra_path, plain_http=plain_http, **settings
        ) as server:
            info = server.stats()
            log(
                f"encode {label} {mode}: server up in {server.startup_s:.1f} s "
                f"(loop {info['loop']}, httptools {info['httptools']})"
            )
            # GET /health (no body, no model) on the tiny model's batched server: what the
            # HTTP stack alone serves, the ceiling of any endpoint on this machine.
            for kind in kinds + (("health",) if ceiling and mode == "batched" else ()):

                def make(n: int, kind: str = kind) -> Request:
                    if kind == "health":
                        return ("GET", "/health", b"", None)
                    if kind == "text":
                        return ("POST", "/api/encode/text", text_bodies[n % len(texts)], JSON)
                    return ("POST", "/api/encode/image", *image_bodies[n % len(image_bodies)])

                for clients in CLIENTS if kind != "health" else (32,):
                    r = asyncio.run(load(server.port, make, clients, warmup, duration))
                    if kind != "health":
                        got = json.loads(r["first_body"])
                        assert got["dim"] == got["model"]["embed_dim"] and len(got["vectors"]) == 1
                    cpu = r["stats_end"]["cpu_s"] - r["stats_begin"]["cpu_s"]
                    which = "images" if kind == "image" else "texts"
                    b, e = r["stats_begin"][which], r["stats_end"][which]
                    passes = e["passes"] - b["passes"]
                    row = {
                        "model": label,
                        "mode": mode,
                        "http": f"{info['loop']}, {'httptools' if info['httptools'] else 'h11'}",
                        **settings,
                        "kind": kind,
                        "clients": clients,
                        "requests": r["requests"],
                        "seconds": round(r["seconds"], 2),
                        "requests_per_s": round(r["requests"] / r["seconds"], 1),
                        "items_per_pass": round((e["items"] - b["items"]) / max(1, passes), 2)
                        if kind != "health"
                        else None,
                        "passes": passes if kind != "health" else None,
                        "latency_ms": dist(r["latencies_ms"]),
                        "server_cpu_ms_per_request": round(1000 * cpu / max(1, r["requests"]), 2),
                        "server_cpu_share": round(cpu / r["seconds"], 2),
                        "client_cpu_share": round(r["client_cpu_s"] / r["seconds"], 2),
                    }
                    rows.append(row)
                    log(
                        f"  {kind:6s} x{clients:2d}: {row['requests_per_s']:8.1f} req/s, "
                        f"{row['items_per_pass']} items/pass, client CPU "
                        f"{row['client_cpu_share']}, server CPU {row['server_cpu_share']} "
                        f"({row['server_cpu_ms_per_request']} ms/req), p50 "
                        f"{row['latency_ms']['p50']:.1f} ms"
                    )
    return rows


def encode_part(args: argparse.Namespace) -> dict[str, Any]:
    from bench.common import vit_b32_checkpoint

    log("encode: tables written by the pipeline (tiny, random ViT-B/32)")
    tiny = real_table("tiny-table", "tiny")
    vit = real_table("vit-b32-table", vit_b32_checkpoint(), images=8)
    rows = encode_runs(
        "tiny", tiny, {"batched": BATCHED, "single": SINGLE, "no-wait": NO_WAIT},
        args.warmup, args.duration, ceiling=True,
    )  # fmt: skip
    # A pass over 16-32 images of ViT-B/32 takes seconds on a CPU: a longer window.
    rows += encode_runs(
        "ViT-B/32", vit, {"batched": BATCHED, "single": SINGLE},
        3 * args.warmup, 3 * args.duration,
    )  # fmt: skip
    # The same server on uvicorn's pure-Python parts (h11, asyncio's loop): what a server
    # without the serve extra's httptools and uvloop does.
    rows += encode_runs(
        "tiny, h11+asyncio", tiny, {"batched": BATCHED, "single": SINGLE},
        args.warmup, args.duration, ceiling=True, kinds=("text",), plain_http=True,
    )  # fmt: skip
    return {"rows": rows, "target": encode_target(rows)}


def encode_target(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {(r["model"], r["mode"], r["kind"], r["clients"]): r["requests_per_s"] for r in rows}
    out: dict[str, Any] = {}
    for model in ("tiny", "tiny, h11+asyncio"):
        if (model, "batched", "text", 32) not in by:
            continue
        batched, single = by[(model, "batched", "text", 32)], by[(model, "single", "text", 32)]
        health = by.get((model, "batched", "health", 32))
        out[model] = {
            "batched": batched,
            "single": single,
            "ratio": round(batched / single, 2),
            "met": batched / single >= 5,
            # No endpoint serves more than the HTTP stack alone: the ratio's ceiling.
            "health": health,
            "ceiling_ratio": round(health / single, 2) if health else None,
        }
    return {**out["tiny"], "variants": out}


# -- 2. search ------------------------------------------------------------------------------
def mixture(rng: Any, centers: Any, n: int, spread: float = SPREAD) -> Any:
    import numpy as np

    which = rng.integers(0, len(centers), n)
    noise = rng.standard_normal((n, centers.shape[1]), dtype=np.float32)
    noise *= spread / np.sqrt(centers.shape[1])
    x = centers[which] + noise
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def centers_for(dim: int) -> Any:
    import numpy as np

    rng = np.random.default_rng(1000 + dim)
    c = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def synthetic_root(rows: int, dim: int, meta: dict[str, Any], fresh: bool) -> tuple[str, dict]:
    """A table of ``rows`` rows in clipbatch's schema and file metadata (``meta``: a real
    file's, the model's dim set), ``ROWS_PER_FILE`` rows a file, with its kNN index."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.common import work_dir
    from clipbatch.knn.build import build_index
    from clipbatch.sink.schema import build_schema, encode_metadata

    root = work_dir() / "serve" / f"search-{dim}d-{rows}"
    done = root / "_bench_done.json"
    if done.is_file() and not fresh:
        return str(root), json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    start = time.perf_counter()
    rng = np.random.default_rng(rows + dim)
    centers = centers_for(dim)
    schema = build_schema(dim, "float16", [])
    files = max(1, rows // ROWS_PER_FILE)
    at = 0
    for f, n in enumerate(len(a) for a in np.array_split(np.arange(rows), files)):
        vectors = mixture(rng, centers, n).astype(np.float16)
        failed = rng.random(n) < FAILED
        vectors[failed] = 0
        keys = [f"{at + i:09d}" for i in range(n)]
        shas = rng.integers(0, 256, (n, 32), dtype=np.uint8)
        sims = rng.uniform(0.1, 0.4, n).astype(np.float32)
        emb_type = schema.field("image_embedding").type
        columns = {
            "key": pa.array(keys),
            "source_uri": pa.array([f"/synthetic/{f:05d}.tar"] * n),
            "source_member": pa.array(keys),
            "source_version": pa.array(["synthetic"] * n),
            "caption": pa.array([f"synthetic caption {at + i}" for i in range(n)]),
            "caption_truncated": pa.array(np.zeros(n, bool)),
            "image_sha256": pa.array(
                [None if bad else row.tobytes() for row, bad in zip(shas, failed, strict=True)],
                pa.binary(32),
            ),
            "width": pa.array(np.full(n, 64, np.int32)),
            "height": pa.array(np.full(n, 64, np.int32)),
            "status": pa.array(np.where(failed, "decode_error", "ok")),
            "error": pa.array(["synthetic failure" if bad else None for bad in failed]),
            "image_embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.ravel()), type=emb_type
            ),
            # Not read by image search: all-zero (absent), which compresses to nothing.
            "text_embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(np.zeros(n * dim, np.float16)), type=emb_type
            ),
            "similarity": pa.array(sims, mask=failed),
        }
        file_meta = {
            **meta,
            "rows": n,
            "fingerprint": f"synthetic-{dim}-{rows}-{f}",
            "source": {**(meta.get("source") or {}), "uri": f"/synthetic/{f:05d}.tar"},
        }
        table = pa.table(columns).cast(schema).replace_schema_metadata(encode_metadata(file_meta))
        pq.write_table(table, root / f"{f:05d}.parquet", compression="zstd")
        at += n
    written = time.perf_counter() - start
    log(f"  wrote {rows:,} rows x {dim} d in {files} files: {written:.1f} s; indexing")
    report = build_index(str(root), "image")
    info = {
        "rows": rows,
        "dim": dim,
        "files": files,
        "vectors": report.vectors,
        "factory": report.factory,
        "write_s": round(written, 1),
        "index_build_s": report.seconds,
    }
    done.write_text(json.dumps(info))
    log(f"  index {report.factory} over {report.vectors:,} vectors: {report.seconds:.1f} s")
    return str(root), info


def search_http(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(a) dim 64 under the tiny model's metadata: text queries over HTTP."""
    import httpx

    from clipbatch.tables.table import open_table

    tiny = real_table("tiny-table", "tiny")
    meta = open_table(tiny).files[0].metadata or {}
    queries = captions(args.queries + args.search_warmup, seed=77)
    rows = []
    for size in args.sizes:
        root, info = synthetic_root(size, 64, meta, args.fresh)
        for method in ("knn", "brute force"):
            name = f"search-{size}-{method.replace(' ', '-')}"
            with serving(root, brute_force=method != "knn", log_name=name) as server:
                stats = server.stats()
                idle = server.status()
                log(
                    f"search {size:,} rows, {method}: up in {server.startup_s:.1f} s, "
                    f"RSS {idle['rss_mib']:.0f} MiB"
                )
                encode, search, total = [], [], []
                with httpx.Client(timeout=300) as client:
                    for i, text in enumerate(queries):
                        t = time.perf_counter()
                        r = client.post(f"{server.url}/api/search", json={"text": text})
                        ms = 1000 * (time.perf_counter() - t)
                        r.raise_for_status()
                        body = r.json()
                        if i >= args.search_warmup:
                            encode.append(body["encode_ms"])
                            search.append(body["search_ms"])
                            total.append(ms)
                after = server.status()
            row = {
                "dim": 64,
                "rows": size,
                "method": method,
                "detail": body["method"]["detail"],
                "hits": len(body["hits"]),
                "encode_ms": dist(encode),
                "search_ms": dist(search),
                "end_to_end_ms": dist(total),
                "startup_s": round(server.startup_s, 2),
                "load_s": stats["load_s"],
                "import_s": stats["import_s"],
                "rss_mib": round(after["rss_mib"], 1),
                "peak_rss_mib": round(after["peak_rss_mib"], 1),
                "table": info,
            }
            rows.append(row)
            log(
                f"  encode p50 {row['encode_ms']['p50']} ms; search p50/p99 "
                f"{row['search_ms']['p50']}/{row['search_ms']['p99']} ms; end-to-end p50/p99 "
                f"{row['end_to_end_ms']['p50']}/{row['end_to_end_ms']['p99']} ms"
            )
    return rows


def search_direct(args: argparse.Namespace) -> list[dict[str, Any]]:
    """(b) dim 512: RootSearch with query vectors from the table's mixture."""
    import gc

    import numpy as np

    from clipbatch.serve.search import RootSearch
    from clipbatch.tables.table import open_table

    tiny = real_table("tiny-table", "tiny")
    meta = dict(open_table(tiny).files[0].metadata or {})
    meta["model"] = dict(RANDOM_MODEL)
    rows = []
    for size in args.sizes:
        root, info = synthetic_root(size, 512, meta, args.fresh)
        queries = mixture(
            np.random.default_rng(7), centers_for(512), args.queries + args.search_warmup
        )
        for method in ("knn", "brute force"):
            # Brute force over 512-d float16 takes seconds a query at 1M rows: 3 warm-up
            # queries, then until --brute-budget s are spent (at least 20 queries).
            warm = args.search_warmup if method == "knn" else 3
            t = time.perf_counter()
            rs = RootSearch(root, use_index=method == "knn")
            opened = time.perf_counter() - t
            times = []
            budget = args.brute_budget if method != "knn" else float("inf")
            spent = 0.0
            for i, q in enumerate(queries):
                t = time.perf_counter()
                found, how = rs.search(q[None, :], 24)
                ms = 1000 * (time.perf_counter() - t)
                assert len(found[0]) == 24
                if i >= warm:
                    times.append(ms)
                    spent += ms / 1000
                    if spent > budget and len(times) >= 20:
                        break
            row = {
                "dim": 512,
                "rows": size,
                "method": method,
                "detail": how.detail,
                "search_ms": dist(times),
                "open_s": round(opened, 2),
                "table": info,
            }
            rows.append(row)
            log(
                f"search 512 d {size:,} rows, {method}: p50/p99 {row['search_ms']['p50']}/"
                f"{row['search_ms']['p99']} ms over {len(times)} queries (opened in "
                f"{opened:.1f} s)"
            )
            del rs
            gc.collect()
    return rows


def baseline() -> dict[str, Any]:
    """The server on a 16-row table: start-up and RSS before any rows count."""
    with serving(real_table("tiny-table", "tiny"), log_name="baseline") as server:
        status = server.status()
        out = {"startup_s": round(server.startup_s, 2), "rss_mib": round(status["rss_mib"], 1)}
    log(f"baseline (16 rows): up in {out['startup_s']} s, RSS {out['rss_mib']:.0f} MiB")
    return out


def search_part(args: argparse.Namespace) -> dict[str, Any]:
    base = baseline()
    http = search_http(args)
    direct = search_direct(args) if not args.skip_512 else []
    out: dict[str, Any] = {"baseline": base, "http": http, "direct": direct, "target": {}}
    big = max(args.sizes)
    for label, rows, field in (("dim 64, HTTP search_ms", http, "search_ms"),
                               ("dim 512, RootSearch", direct, "search_ms")):  # fmt: skip
        for r in rows:
            if r["rows"] == big and r["method"] == "knn":
                p99 = r[field]["p99"]
                out["target"][label] = {"rows": big, "p99_ms": p99, "met": p99 <= 50}
    return out


# -- 3. row images from S3 ------------------------------------------------------------------
def images_part(args: argparse.Namespace) -> dict[str, Any]:
    import boto3
    import httpx
    from moto.server import ThreadedMotoServer

    from bench.common import run_pipeline, work_dir
    from clipbatch.synthetic import write_webdataset
    from tests.faultproxy import FaultProxy

    base = work_dir() / "serve" / f"s3-{args.samples}"
    tar = base / "00000.tar"
    if not tar.is_file() or args.fresh:
        shutil.rmtree(base, ignore_errors=True)
        t = time.perf_counter()
        write_webdataset(base, shards=1, per_shard=args.samples, seed=21, size=48)
        log(f"images: wrote a tar of {args.samples:,} samples in {time.perf_counter() - t:.1f} s")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{server._server.server_port}"  # noqa: SLF001
    proxy = FaultProxy(endpoint).start()
    out: dict[str, Any] = {"samples": args.samples, "tar_bytes": tar.stat().st_size}
    try:
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        bucket = f"serve-{uuid.uuid4().hex[:8]}"
        s3.create_bucket(Bucket=bucket)
        s3.upload_file(str(tar), bucket, "wds/00000.tar")
        storage = {"endpoint_url": endpoint}
        t = time.perf_counter()
        run_pipeline(
            {
                "source": {"url": f"s3://{bucket}/wds", "storage": storage},
                "sink": {"url": f"s3://{bucket}/emb", "storage": storage},
                "model": {"name": "tiny"},
                "runtime": {"device": "cpu", "batch_size": 256},
            }
        )
        out["embed_s"] = round(time.perf_counter() - t, 1)
        log(f"images: embedded to S3 in {out['embed_s']} s")
        # The same table without _members/ (as written before it existed).
        listed = s3.list_objects_v2(Bucket=bucket, Prefix="emb/")["Contents"]
        for obj in listed:
            if "/_members/" not in obj["Key"]:
                s3.copy_object(
                    Bucket=bucket,
                    Key="emb-old/" + obj["Key"][len("emb/") :],
                    CopySource={"Bucket": bucket, "Key": obj["Key"]},
                )
        out["members_objects"] = [o["Key"] for o in listed if "/_members/" in o["Key"]]
        rng = random.Random(4)
        keys = rng.sample(range(1, args.samples), 2 * args.image_requests + 1)
        later_keys = keys[: args.image_requests]
        thumb_keys = keys[args.image_requests : 2 * args.image_requests]

        def settle() -> None:
            """The proxy counts a request when it arrives, and records the exchange when
            its connection closes, a moment after the answer: wait for the records."""
            deadline = time.monotonic() + 5
            while len(proxy.exchanges) < proxy.stats["requests"] and time.monotonic() < deadline:
                time.sleep(0.002)

        anomalies: list[dict[str, Any]] = []

        def timed(client: Any, path: str, expect: int | None = None) -> tuple[float, int, int]:
            settle()
            seen = len(proxy.exchanges)
            t = time.perf_counter()
            r = client.get(path)
            ms = 1000 * (time.perf_counter() - t)
            r.raise_for_status()
            settle()
            made = proxy.exchanges[seen:]
            if expect is not None and len(made) != expect:
                anomalies.append(
                    {"path": path, "requests": [e.method + " " + e.target for e in made]}
                )
            return ms, len(made), sum(e.received for e in made)

        def summary(samples: list[tuple[float, int, int]]) -> dict[str, Any]:
            return {
                "latency_ms": dist([s[0] for s in samples]),
                "requests_mean": round(sum(s[1] for s in samples) / len(samples), 3),
                "requests_max": max(s[1] for s in samples),
                "bytes_received_mean": round(sum(s[2] for s in samples) / len(samples)),
            }

        for table, label in (("emb", "with _members/"), ("emb-old", "without _members/")):
            root = f"s3://{bucket}/{table}"
            with serving(root, endpoint=proxy.url, log_name=f"images-{table}") as srv:
                log(f"images {label}: server up in {srv.startup_s:.1f} s")
                with httpx.Client(base_url=srv.url, timeout=300) as client:
                    first_key = f"{0:09d}"
                    seen = len(proxy.exchanges)
                    first = timed(client, f"/api/image/{first_key}")
                    targets = [e.method + " " + e.target for e in proxy.exchanges[seen:]]
                    n_later = len(later_keys) if table == "emb" else args.image_requests // 4
                    later = [
                        timed(client, f"/api/image/{k:09d}", expect=1) for k in later_keys[:n_later]
                    ]
                    row: dict[str, Any] = {
                        "table": label,
                        "startup_s": round(srv.startup_s, 2),
                        "first": {
                            "latency_ms": round(first[0], 2),
                            "requests": first[1],
                            "bytes_received": first[2],
                            "what": targets,
                        },
                        "later": summary(later),
                    }
                    if table == "emb":
                        thumbs = [
                            timed(client, f"/api/thumbnail/{k:09d}?size=256", expect=1)
                            for k in thumb_keys
                        ]
                        cached = [
                            timed(client, f"/api/thumbnail/{k:09d}?size=256", expect=0)
                            for k in thumb_keys[:50]
                        ]
                        row["thumbnail"] = summary(thumbs)
                        row["thumbnail_cached"] = summary(cached)
                    row["server_counter"] = srv.stats()["row_image_requests"]
                out[table] = row
                log(
                    f"  first {row['first']['latency_ms']} ms, {row['first']['requests']} "
                    f"requests ({row['first']['bytes_received']:,} B); later p50 "
                    f"{row['later']['latency_ms']['p50']} ms, "
                    f"{row['later']['requests_mean']} requests"
                )
    finally:
        proxy.stop()
        server.stop()
    out["anomalies"] = anomalies[:20]
    worst = max(out["emb"]["first"]["requests"], out["emb"]["later"]["requests_max"])
    out["target"] = {"max_requests_per_row_image": worst, "met": worst <= 3}
    return out


# -- report ---------------------------------------------------------------------------------
def method_label(x: dict[str, Any]) -> str:
    return f"knn ({x['table']['factory']})" if x["method"] == "knn" else x["method"]


def quiet_note(m: dict[str, Any]) -> str:
    if m.get("quiet") is None:
        return "not waited for: --no-wait"
    if m["quiet"]:
        return f"waited {m['waited_s']} s for the 1-minute load to fall to 1.5"
    return f"still above 1.5 after waiting {m['waited_s']} s: measured anyway"


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"## clipbatch serve ({r['date']}, CPU: {m['cpu']} x{m['cores']})",
        "",
        f"Load average at start: {' '.join(str(x) for x in m['load_at_start'])} on "
        f"{m['cores']} cores ({quiet_note(m)}). "
        f"`python -m bench.serve` ({r['total_s'] / 60:.1f} min); raw figures: "
        "bench/serve.json. Server: `create_app` under uvicorn in its own process on "
        "127.0.0.1, as `clipbatch serve` runs it. Clients, in the bench's process on the same "
        "cores: for load (part 1) a minimal asyncio HTTP/1.1 client, one keep-alive "
        "connection per client (httpx's AsyncClient took about 3 ms of CPU per request here, "
        "as much as the server, and the figures measured the client); for latency (parts 2 "
        "and 3) httpx, one request at a time.",
        "",
    ]
    enc = r.get("encode")
    if enc:
        lines += [
            "### 1. Encode: dynamic batching against one forward pass per request",
            "",
            "One caption or one JPEG (64 px for tiny, 224 px for ViT-B/32) per request; "
            "each client sends its next request when its last is answered; requests/s over "
            "a window of at least 2 requests per client after a warm-up of at least 1 ("
            f"{r['args']['warmup']} + {r['args']['duration']} s at least for tiny, three "
            "times that for ViT-B/32). *batched*: max_batch 64, max_wait_ms 5 "
            "(the default); *single*: max_batch 1, max_wait_ms 0; *no-wait*: max_batch 64, "
            "max_wait_ms 0. Items per pass: the server's `DynamicBatcher.stats` over the "
            "window. Server CPU: user + system seconds of the server process (all its threads) "
            "per request; cores busy: those seconds over the window (2 = both cores), the "
            "client's likewise.",
            "",
            "| model | input | clients | mode | requests/s | items/pass | p50 ms | p99 ms "
            "| server CPU ms/request | server cores busy | client cores busy |",
            "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for x in enc["rows"]:
            per_pass = "-" if x["items_per_pass"] is None else x["items_per_pass"]
            lines.append(
                f"| {x['model']} | {x['kind']} | {x['clients']} | {x['mode']} "
                f"| {x['requests_per_s']:,.1f} | {per_pass} "
                f"| {x['latency_ms']['p50']} | {x['latency_ms']['p99']} "
                f"| {x['server_cpu_ms_per_request']} | {x['server_cpu_share']} "
                f"| {x['client_cpu_share']} |"
            )
        t = enc["target"]
        lines += [
            "",
            f"Target: 32 text clients on tiny, batched >= 5x single: {t['batched']:,.1f} / "
            f"{t['single']:,.1f} = {t['ratio']}x, **{'PASS' if t['met'] else 'FAIL'}**. "
            f"The ceiling: `GET /health` (no body, no model) with 32 clients is served at "
            f"{t['health']:,.1f} requests/s, {t['ceiling_ratio']}x the single-pass rate: "
            "FastAPI's whole stack, which a well-formed encode request skips "
            "(`serve/fastpath.py`).",
        ]
        alt = t["variants"].get("tiny, h11+asyncio")
        if alt:
            lines.append(
                f"Without httptools and uvloop (uvicorn's h11 and asyncio's loop): batched "
                f"{alt['batched']:,.1f}, single {alt['single']:,.1f} ({alt['ratio']}x), "
                f"`/health` {alt['health']:,.1f} ({alt['ceiling_ratio']}x)."
            )
        lines.append("")
    se = r.get("search")
    if se:
        lines += [
            "### 2. Search latency",
            "",
            f"Synthetic tables in clipbatch's schema ({ROWS_PER_FILE:,} rows a file; "
            f"{CLUSTERS:,} clusters, spread {SPREAD}, as bench/knn.py; 2 % failed rows "
            "without a vector), kNN index by `build_index` (auto). One sequential client, "
            f"{r['args']['search_warmup']} warm-up queries then {r['args']['queries']}; k = 24.",
            "",
            "(a) dim 64, the tiny model's file metadata: text queries through `/api/search`, "
            "encoded by the tiny model for real. `encode_ms` and `search_ms` are the "
            "response's own; end-to-end is the client's (HTTP, JSON, the 24 hits). Start-up: "
            "from spawning the server process to `/health` answering (imports, model, "
            "catalog, index). RSS after the queries. The same server on a 16-row table "
            f"starts in {se['baseline']['startup_s']} s with {se['baseline']['rss_mib']:,.0f} "
            "MiB (Python, torch, the model).",
            "",
            "| rows | method | encode p50 / p99 ms | search p50 / p99 ms | end-to-end p50 / "
            "p99 ms | start-up s | RSS MiB |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for x in se["http"]:
            lines.append(
                f"| {x['rows']:,} | {method_label(x)} "
                f"| {x['encode_ms']['p50']} / {x['encode_ms']['p99']} "
                f"| {x['search_ms']['p50']} / {x['search_ms']['p99']} "
                f"| {x['end_to_end_ms']['p50']} / {x['end_to_end_ms']['p99']} "
                f"| {x['startup_s']} | {x['rss_mib']:,.0f} |"
            )
        if se["direct"]:
            lines += [
                "",
                "(b) dim 512 (ViT-B/32's width), `RootSearch.search` called directly with "
                "query vectors drawn from the table's mixture (no HTTP, no model). Brute "
                "force: 3 warm-up queries, then it stops once "
                f"{r['args']['brute_budget']:.0f} s are spent (at least 20 queries).",
                "",
                "| rows | method | queries | search p50 / p99 ms | open s |",
                "|---:|---|---:|---:|---:|",
            ]
            for x in se["direct"]:
                lines.append(
                    f"| {x['rows']:,} | {method_label(x)} "
                    f"| {x['search_ms']['n']} | {x['search_ms']['p50']} / "
                    f"{x['search_ms']['p99']} | {x['open_s']} |"
                )
        lines += ["", "Tables (made once, reused by a rerun):", ""]
        lines += ["| rows | dim | files | vectors | index | write s | index build s |"]
        lines += ["|---:|---:|---:|---:|---|---:|---:|"]
        seen = set()
        for x in se["http"] + se["direct"]:
            t = x["table"]
            if (t["rows"], t["dim"]) in seen:
                continue
            seen.add((t["rows"], t["dim"]))
            lines.append(
                f"| {t['rows']:,} | {t['dim']} | {t['files']} | {t['vectors']:,} "
                f"| {t['factory']} | {t['write_s']} | {t['index_build_s']} |"
            )
        lines.append("")
        for label, t in se["target"].items():
            lines.append(
                f"Target: search through the index, without query encoding, p99 <= 50 ms at "
                f"{t['rows']:,} rows ({label}): {t['p99_ms']} ms, "
                f"**{'PASS' if t['met'] else 'FAIL'}**."
            )
            lines.append("")
    im = r.get("images")
    if im:
        lines += [
            "### 3. A row's image from a tar on S3",
            "",
            f"One tar of {im['samples']:,} samples (48 px JPEGs, {im['tar_bytes'] / 2**20:.1f} "
            "MiB) on moto's S3 server (127.0.0.1), embedded with the tiny model to S3 "
            f"({im['embed_s']} s). The server reads S3 through a counting proxy "
            "(tests/faultproxy.py): *requests* are the real HTTP requests it forwarded "
            "during one `/api/image` or `/api/thumbnail` call; latency is the client's. "
            f"Later rows: {r['args']['image_requests']} distinct random rows (a quarter "
            "as many without `_members/`); thumbnails (256 px): as many other rows, then "
            "50 of them again (cached).",
            "",
            "| table | call | latency p50 / p99 ms | S3 requests (mean / max) | bytes received |",
            "|---|---|---:|---:|---:|",
        ]
        for table in ("emb", "emb-old"):
            x = im[table]
            f = x["first"]
            lines.append(
                f"| {x['table']} | first image of the shard | {f['latency_ms']} | "
                f"{f['requests']} | {f['bytes_received']:,} |"
            )
            for key, name in (("later", "later images"), ("thumbnail", "thumbnails"),
                              ("thumbnail_cached", "thumbnails, cached")):  # fmt: skip
                if key in x:
                    s = x[key]
                    lines.append(
                        f"| {x['table']} | {name} | {s['latency_ms']['p50']} / "
                        f"{s['latency_ms']['p99']} | {s['requests_mean']} / "
                        f"{s['requests_max']} | {s['bytes_received_mean']:,} |"
                    )
        lines += [
            "",
            "First image's requests, with `_members/`: "
            + ", ".join(f"`{w}`" for w in im["emb"]["first"]["what"])
            + "; without: "
            + ", ".join(f"`{w}`" for w in im["emb-old"]["first"]["what"])
            + ".",
            "",
            f"Target: a row image from S3 in <= 3 requests: at most "
            f"{im['target']['max_requests_per_row_image']}, "
            f"**{'PASS' if im['target']['met'] else 'FAIL'}**.",
            "",
        ]
    return "\n".join(lines) + "\n"


def write_results(r: dict[str, Any]) -> None:
    write_figures("serve", r)
    write_section("serve", markdown(r))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="encode,search,images", help="which parts to run")
    p.add_argument("--warmup", type=float, default=2.0, help="encode warm-up s (tiny)")
    p.add_argument("--duration", type=float, default=6.0, help="encode window s (tiny)")
    p.add_argument("--sizes", default="100000,1000000", help="search table sizes (rows)")
    p.add_argument("--queries", type=int, default=200, help="search queries measured")
    p.add_argument("--search-warmup", type=int, default=20)
    p.add_argument("--brute-budget", type=float, default=60.0, help="s of 512-d brute force")
    p.add_argument("--skip-512", action="store_true", help="no 512-d RootSearch figures")
    p.add_argument("--samples", type=int, default=10_000, help="samples in the S3 tar")
    p.add_argument("--image-requests", type=int, default=200)
    p.add_argument("--fresh", action="store_true", help="make the synthetic inputs again")
    p.add_argument("--plain-http", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine")
    p.add_argument("--no-write", action="store_true", help="print only")
    # The server process (internal).
    p.add_argument("--child-server", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max-batch", type=int, default=64, help=argparse.SUPPRESS)
    p.add_argument("--max-wait-ms", type=float, default=5.0, help=argparse.SUPPRESS)
    p.add_argument("--brute-force", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_server:
        return child_server(args)

    os.environ.update(
        {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
    )
    os.environ.pop("AWS_PROFILE", None)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto logs every request
    from clipbatch.settings import apply_process_settings

    apply_process_settings()
    sys.path.insert(0, str(REPO))  # tests.faultproxy
    args.sizes = [int(s) for s in args.sizes.split(",")]
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    quiet = (
        {"load_at_start": [round(x, 2) for x in os.getloadavg()], "waited_s": 0, "quiet": None}
        if args.no_wait
        else wait_for_quiet(1.5, 900)
    )
    log(f"load at start: {quiet['load_at_start']}")
    start = time.perf_counter()
    r: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), **quiet},
        "args": {k: v for k, v in vars(args).items() if k not in ("root", "port", "endpoint")},
    }
    if "encode" in parts:
        r["encode"] = encode_part(args)
    if "search" in parts:
        r["search"] = search_part(args)
    if "images" in parts:
        r["images"] = images_part(args)
    r["total_s"] = round(time.perf_counter() - start, 1)
    r["machine"]["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    print(markdown(r))
    if not args.no_write:
        write_results(r)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
