"""Issue 5: exactly-once output under real faults (design.md §2, §4, §5).

Storage is moto's S3 server; faults are real: a proxy of ours answering 503 SlowDown,
resetting connections and cutting bodies off (tests/faultproxy.py), a storage server
stopped mid-run, worker processes SIGKILLed at exact commit points (CLIPBATCH_CRASH_AT,
clipbatch/faults.py), two runs at once on one destination. Every case ends by
comparing the table, row for row, with a fault-free run over the same source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbatch.config import ModelConfig, StorageOptions, build_config
from clipbatch.encode.encoder import ClipEncoder
from clipbatch.faults import OOM_ENV
from clipbatch.io.retry import STORAGE
from clipbatch.io.storage import get_fs
from clipbatch.models.loading import load_model
from clipbatch.sink.commits.index import all_records, listed_versions, load_index
from clipbatch.sink.commits.segments import CommitRecord
from clipbatch.sink.commits.writer import IndexWriter
from clipbatch.sink.schema import decode_metadata
from clipbatch.synthetic import write_webdataset
from tests.conftest import free_port, upload_dir
from tests.faultproxy import FaultProxy
from tests.faultworker import start_worker
from tests.helpers import read_table, tiny_s3_config

pytestmark = pytest.mark.timeout(240)

SHARDS = 4
PER_SHARD = 4
# botocore's own retries off, so the faults reach our retry layer (what the library sets:
# see test_a_fault_reaches_our_retry_layer_after_one_request), and a shorter read timeout.
NO_BOTO_RETRIES = {"config_kwargs": {"retries": {"total_max_attempts": 1}, "read_timeout": 10}}


def make_config(source: str, dest: str, endpoint: str, extra: dict | None = None, **runtime):
    runtime = {"batch_size": 4, "decode_workers": 1, "retry_delay_seconds": 0, **runtime}
    return tiny_s3_config(source, dest, endpoint, storage_extra=extra, **runtime)


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    name = f"faults-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def source(tmp_path_factory, bucket: str, s3_endpoint: str) -> str:
    local = tmp_path_factory.mktemp("src")
    write_webdataset(local, shards=SHARDS, per_shard=PER_SHARD, seed=5, size=48)
    return upload_dir(local, bucket, "src", s3_endpoint)


@pytest.fixture(scope="module")
def reference(prefect_harness, source: str, bucket: str, s3_endpoint: str) -> pa.Table:
    """The fault-free run's table, sorted by key."""
    from clipbatch_flows.embed import embed_dataset

    dest = f"s3://{bucket}/reference"
    summary = embed_dataset(make_config(source, dest, s3_endpoint))
    assert summary["shards_committed"] == SHARDS
    return sorted_table(dest, s3_endpoint)


@pytest.fixture
def proxy(s3_endpoint: str):
    p = FaultProxy(s3_endpoint).start()
    yield p
    p.stop()


def sorted_table(dest: str, endpoint: str) -> pa.Table:
    table, _ = read_table(dest, endpoint)
    return table.sort_by("key")


def assert_exact(dest: str, endpoint: str, reference: pa.Table) -> None:
    """One file per shard, no _tmp left, manifest = footers, rows equal the reference."""
    fs, root = get_fs(dest, StorageOptions(endpoint_url=endpoint))
    objects = [p[len(root) + 1 :] for p in fs.find(root)]
    assert not [p for p in objects if p.startswith("_tmp")], objects
    files = sorted(p for p in objects if p.endswith(".parquet") and not p.startswith("_"))
    assert files == [f"{i:05d}.parquet" for i in range(SHARDS)]
    table = sorted_table(dest, endpoint)
    keys = table.column("key").to_pylist()
    assert len(keys) == len(set(keys)) == SHARDS * PER_SHARD  # no duplicates, none missing
    assert table.schema.equals(reference.schema)
    numeric = {"image_embedding", "text_embedding", "similarity"}
    differ = [
        c for c in reference.column_names if c not in numeric and not table[c].equals(reference[c])
    ]
    assert not differ, f"columns differ from the fault-free run: {differ}"
    # Embeddings: the same rows, equal up to CPU kernel nondeterminism. BLAS may use
    # fewer threads on a loaded machine, which changes summation order in the last
    # float32 bits and can flip a float16 rounding; nothing else may differ.
    for c in numeric:
        got = np.asarray(table[c].to_pylist(), np.float32)
        want = np.asarray(reference[c].to_pylist(), np.float32)
        np.testing.assert_allclose(got, want, atol=2e-3, rtol=0, err_msg=c)
    # The commit index describes exactly the files there now, with their footers' data.
    sink = build_config(
        {"source": "x", "sink": {"url": dest, "storage": {"endpoint_url": endpoint}}}
    ).sink
    index = load_index(sink, listed_versions(sink))
    assert sorted(index.rows) == [f"{i:05d}" for i in range(SHARDS)]
    for name in index.rows:
        entry = index.get(name)
        meta = decode_metadata(pq.read_metadata(f"{root}/{name}.parquet", filesystem=fs).metadata)
        assert entry.fingerprint == meta["fingerprint"]
        assert entry.rows == meta["rows"] == PER_SHARD


@pytest.mark.slow
def test_transient_read_and_write_faults_give_exact_output(
    prefect_harness, source, bucket, s3_endpoint, reference, proxy
):
    from clipbatch_flows.embed import embed_dataset

    dest = f"s3://{bucket}/transient"
    # Reads of the tar shards: throttled, reset, cut off mid-body, slow.
    proxy.inject("slowdown", 2, "GET", ".tar")
    proxy.inject("reset", 2, "GET", ".tar")
    proxy.inject("cut", 2, "GET", ".tar")
    proxy.inject("delay", 4, "GET", ".tar", seconds=0.3)
    # Writes: the commit index PUT reset; a staged upload that lands but whose answer is
    # cut off; SlowDowns; then 10 InternalErrors in a row on staging uploads, more than
    # our with_retries (6 attempts) absorbs, so the shard task itself fails and is retried.
    proxy.inject("reset", 1, "PUT", "/_commits/")
    proxy.inject("cut", 1, "PUT", "/_tmp/")
    proxy.inject("slowdown", 2, "PUT", "/_tmp/")
    proxy.inject("internal", 10, "PUT", "/_tmp/")
    cfg = make_config(source, dest, proxy.url, NO_BOTO_RETRIES, task_retries=5)
    summary = embed_dataset(cfg)
    assert summary["shards_committed"] == SHARDS and summary["shards_failed"] == 0
    assert proxy.pending() == 0, "every injected fault fired"
    assert proxy.stats["slowdown"] == 4 and proxy.stats["internal"] == 10
    assert proxy.stats["reset"] == 3 and proxy.stats["cut"] == 3
    assert_exact(dest, s3_endpoint, reference)
    runs = task_run_counts(summary["run_id"])
    encodes = sorted(n for name, n in runs.items() if name.startswith("encode-"))
    # One request per attempt of ours (botocore retries nothing): the first shard meets the
    # faults, and its task fails each time with_retries' 6 attempts run out: 6 failed
    # reads, then 3 + 10 failed uploads, so at least 3 runs, and 4 when they meet it alone.
    assert encodes[:3] == [1, 1, 1] and 3 <= encodes[3] <= 6, runs
    _record("transient", {**proxy.stats, "task_runs": runs})


def test_a_fault_reaches_our_retry_layer_after_one_request(bucket, s3_endpoint, proxy):
    """clipbatch.io.retry is the one retry layer (its table: botocore makes one attempt):
    one 503 SlowDown costs one attempt of ours, logged, and one more request."""
    from clipbatch.io.retry import with_retries

    fs, path = get_fs(f"s3://{bucket}/one-attempt/x.bin", StorageOptions(endpoint_url=proxy.url))
    proxy.inject("slowdown", 1, "PUT")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("clipbatch.io.retry")
    log.addHandler(handler)
    try:
        with_retries(lambda: fs.pipe_file(path, b"x"), "put x")
    finally:
        log.removeHandler(handler)
    assert proxy.stats["slowdown"] == 1 and proxy.stats["requests_PUT"] == 2
    retries = [r.getMessage() for r in records if "retry 1" in r.getMessage()]
    assert len(retries) == 1, "the SlowDown never reached clipbatch.io.retry"


def task_run_counts(flow_run_id: str) -> dict[str, int]:
    """Task run name -> how many times it ran, for one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(flow_run_id)]))
        )
    return {r.name: r.run_count for r in runs}


def wait_until(condition, what: str, timeout: float = 120, every: float = 0.02) -> None:
    """Poll ``condition`` until it holds; raise, naming ``what``, if it never does."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(every)


@pytest.mark.slow
def test_storage_server_stopped_mid_run_then_rerun_is_exact(
    prefect_harness, source, bucket, s3_endpoint, reference
):
    """A second moto server (same in-process store) is stopped under a worker, mid-run.

    Deterministically mid-run: the worker reaches the store through a proxy that holds
    its first read of shard 00001, so shard 00000 is committed and 00001 not when the
    server stops. The store stays down until the worker has given up and reported;
    then it restarts and a rerun finishes the table.
    """
    from clipbatch_flows.embed import embed_dataset
    from moto.server import ThreadedMotoServer

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    proxy = FaultProxy(endpoint).start()
    proxy.inject("hold", 1, "GET", "/src/00001.tar")
    dest = f"s3://{bucket}/outage"
    # The library's own retry settings: the store stays down until they give up.
    cfg = make_config(source, dest, proxy.url)
    direct = cfg.sink.model_copy(update={"storage": StorageOptions(endpoint_url=s3_endpoint)})
    worker = start_worker(cfg, Path(f"/tmp/clipbatch-outage-{uuid.uuid4().hex}.json"))
    try:
        # Shards run in order, so the hold fires only once 00000 is committed.
        wait_until(lambda: proxy.held() == 1, "the worker reading shard 00001")
        assert sorted(listed_versions(direct)) == ["00000"]
        server.stop()  # the store goes down with the worker mid-run...
        proxy.release()  # ...and its read of 00001 now meets a stopped server
        code, report = worker.wait(timeout=180)  # down until the worker gives up
        assert code == 1 and report is not None, (code, report)
        assert report["ok"] is False and report["transient"] is True, report
        attempts = f"still failing after {STORAGE.attempts} attempts"
        assert attempts in report["error"], report["error"]
        assert report["done"] == ["00000"], report  # some shards committed, some not
        assert sorted(listed_versions(direct)) == ["00000"]
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        summary = embed_dataset(cfg)
        assert summary["shards_failed"] == 0
        assert summary["shards_skipped"] == 1 and summary["shards_committed"] == SHARDS - 1
        assert_exact(dest, endpoint, reference)
        _record(
            "outage",
            {
                "committed_before_stop": 1,
                "worker_exit": code,
                "worker_error": report["error"][:200],
                "rerun_committed": summary["shards_committed"],
                "rerun_skipped": summary["shards_skipped"],
            },
        )
    finally:
        proxy.stop()
        server.stop()
        if worker.process.is_alive():
            worker.process.kill()


CRASH_CASES = {
    # point: (staged object left behind, final file left behind, shards the rerun skips)
    "before_staging": (False, False, 1),
    "after_staging": (True, False, 1),
    "mid_move": (True, True, 2),
    "before_manifest": (False, True, 2),
}


@pytest.mark.slow
def test_worker_sigkilled_at_each_commit_point_then_rerun_is_exact(
    prefect_harness, source, bucket, s3_endpoint, reference, tmp_path
):
    from clipbatch_flows.embed import embed_dataset

    workers = {}
    for point in CRASH_CASES:
        cfg = make_config(source, f"s3://{bucket}/kill-{point}", s3_endpoint)
        env = {"CLIPBATCH_CRASH_AT": f"{point}:00001"}
        workers[point] = (cfg, start_worker(cfg, tmp_path / f"{point}.json", env))
    figures = {}
    for point, (cfg, worker) in workers.items():
        code, report = worker.wait()
        assert code == -9 and report is None, f"{point}: the worker was not killed"
        staged_left, final_left, skips = CRASH_CASES[point]
        fs, root = get_fs(cfg.sink.url, cfg.sink.storage)
        objects = [p[len(root) + 1 :] for p in fs.find(root)]
        assert any(p.startswith("_tmp/") for p in objects) == staged_left, objects
        assert ("00001.parquet" in objects) == final_left, objects
        assert "00001" not in {r.shard for r in all_records(cfg.sink)}
        summary = embed_dataset(cfg)
        # Only the remaining shards are encoded; what was committed is reused.
        assert summary["shards_skipped"] == skips
        assert summary["shards_committed"] == SHARDS - skips
        assert_exact(cfg.sink.url, s3_endpoint, reference)
        figures[point] = {"skipped_on_rerun": skips, "redone": SHARDS - skips}
    _record("sigkill", figures)


@pytest.mark.slow
def test_two_concurrent_runs_on_one_dest_leave_a_valid_table(
    source, bucket, s3_endpoint, reference, tmp_path
):
    cfg = make_config(source, f"s3://{bucket}/concurrent", s3_endpoint)
    a = start_worker(cfg, tmp_path / "a.json")
    b = start_worker(cfg, tmp_path / "b.json")
    (code_a, rep_a), (code_b, rep_b) = a.wait(), b.wait()
    assert code_a == 0 and code_b == 0
    # Between them every shard was done at least once; which run did it is a race.
    assert set(rep_a["done"]) | set(rep_b["done"]) == {f"{i:05d}" for i in range(SHARDS)}
    assert_exact(cfg.sink.url, s3_endpoint, reference)
    _record("concurrent", {"a": len(rep_a["done"]), "b": len(rep_b["done"])})


@pytest.mark.slow
def test_a_commit_record_describes_the_file_it_committed_despite_a_concurrent_writer(
    source, bucket, s3_endpoint, tmp_path
):
    """Run A's stat of 00000.parquet, right after its move, is held by a proxy while run B
    (overwrite) commits every shard; then A goes on. Every index record bound to the
    version of 00000.parquet now there must be the record of the run that wrote it."""
    from clipbatch.sink.writer import read_file_metadata

    dest = f"s3://{bucket}/stat-race"
    proxy = FaultProxy(s3_endpoint).start()
    proxy.inject("hold", 1, "HEAD", "/stat-race/00000.parquet")
    slow_reads = {"config_kwargs": {"read_timeout": 600}}  # A waits while B runs
    a_cfg = make_config(source, dest, proxy.url, slow_reads)
    b_cfg = tiny_s3_config(
        source, dest, s3_endpoint, sink={"overwrite": True}, batch_size=4, decode_workers=1
    )
    a = start_worker(a_cfg, tmp_path / "a.json", run_id="run-a")
    try:
        wait_until(lambda: proxy.held() == 1, "run A's stat of 00000.parquet")
        code_b, report_b = start_worker(b_cfg, tmp_path / "b.json", run_id="run-b").wait(180)
        assert code_b == 0 and report_b["done"] == [f"{i:05d}" for i in range(SHARDS)]
        proxy.release()
        code_a, report_a = a.wait(180)
        assert code_a == 0 and report_a["ok"], report_a
    finally:
        proxy.stop()
        if a.process.is_alive():
            a.process.kill()
    sink = build_config(
        {"source": "x", "sink": {"url": dest, "storage": {"endpoint_url": s3_endpoint}}}
    ).sink
    version = listed_versions(sink)["00000"]
    fs, root = get_fs(dest, sink.storage)
    body = fs.cat_file(f"{root}/00000.parquet")
    footer_run = read_file_metadata(f"{dest}/00000.parquet", sink.storage)["run"]["run_id"]
    assert footer_run == "run-b"  # B's copy landed after A's
    bound = [r for r in all_records(sink) if r.shard == "00000" and r.file_version == version]
    assert bound, "no record for the file there"
    described = [(r.run_id, r.sha256 in (None, hashlib.sha256(body).hexdigest())) for r in bound]
    assert described == [("run-b", True)] * len(bound), described


@pytest.mark.slow
def test_failed_flow_run_retried_with_prefect_cli_finishes_the_rest_only(
    prefect_harness, source, bucket, s3_endpoint, reference, proxy
):
    """Reads of one shard keep failing: the run fails; `prefect flow-run retry` finishes it."""
    from clipbatch_flows.embed import embed_dataset
    from prefect.settings import PREFECT_API_URL

    from clipbatch.pipeline.summary import RunFailedError

    dest = f"s3://{bucket}/flow-retry"
    cfg = make_config(source, dest, proxy.url, NO_BOTO_RETRIES)
    proxy.inject("reset", 10_000, "GET", "/src/00002.tar")
    state = embed_dataset(cfg, return_state=True)
    assert state.is_failed()
    assert isinstance(state.result(raise_on_failure=False), RunFailedError)
    fs, root = get_fs(dest, cfg.sink.storage)
    kept = {
        p: fs.info(p)["ETag"]
        for p in fs.find(root)
        if p.endswith(".parquet") and "/_" not in p[len(root) :]
    }
    assert sorted(p.rsplit("/", 1)[-1] for p in kept) == [
        "00000.parquet",
        "00001.parquet",
        "00003.parquet",
    ]
    proxy.clear()  # the store is healthy again
    flow_run_id = str(state.state_details.flow_run_id)
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": os.getcwd()}
    cli = Path(sys.executable).parent / "prefect"
    proc = subprocess.run(
        [
            str(cli),
            "flow-run",
            "retry",
            flow_run_id,
            "--entrypoint",
            "flows/embed.py:embed_dataset",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    # The retry (same flow run) encoded 00002 only; the committed files were not rewritten.
    assert {p: fs.info(p)["ETag"] for p in kept} == kept
    index = load_index(cfg.sink, listed_versions(cfg.sink))
    assert index.get("00002").run_id == flow_run_id
    assert_exact(dest, s3_endpoint, reference)
    _record("flow_retry", {"failed_shards": 1, "retried_by": "prefect flow-run retry"})


@pytest.mark.parametrize("store", ["s3", "local"])
def test_concurrent_index_writers_and_compactions_lose_nothing(
    store, bucket, s3_endpoint, tmp_path, monkeypatch
):
    """8 writers x 8 commits race on one index, each flushing every commit and compacting
    at the end with a tiny segment limit, so compactions overlap each other and new
    segments: every record survives. (The old single _manifest.json needed conditional
    PUTs or flock for this; segments are immutable, so there is nothing to race on.)"""
    import clipbatch.sink.commits.compact as compaction

    monkeypatch.setattr(compaction, "MAX_SEGMENTS", 2)
    url = f"s3://{bucket}/index-race" if store == "s3" else str(tmp_path / "race")
    sink = build_config(
        {"source": "x", "sink": {"url": url, "storage": {"endpoint_url": s3_endpoint}}}
    ).sink
    fs, root = get_fs(url, sink.storage)
    names = [f"t{t}-{i}" for t in range(8) for i in range(8)]
    fs.makedirs(root, exist_ok=True)
    for name in names:  # the shard files the records describe
        fs.pipe_file(f"{root}/{name}.parquet", name.encode())
    versions = listed_versions(sink)
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            index = IndexWriter(sink, f"run-{t}", flush_records=1)
            for i in range(8):
                name = f"t{t}-{i}"
                index.add(
                    CommitRecord(
                        shard=name,
                        file=f"{name}.parquet",
                        file_version=versions[name],
                        fingerprint=f"fp-{name}",
                        rows=i,
                        counts={"ok": i},
                        sha256=None,
                        source_uri=None,
                        source_version=None,
                        run_id=f"run-{t}",
                    )
                )
            index.close()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    index = load_index(sink, listed_versions(sink))
    assert sorted(index.rows) == sorted(names)
    assert {n: index.fingerprint(n) for n in names} == {n: f"fp-{n}" for n in names}


def test_gpu_oom_halves_the_batch_and_goes_on(monkeypatch):
    """A real torch.OutOfMemoryError from forward passes over 3 rows (CLIPBATCH_FAULT_OOM_ABOVE)."""
    loaded = load_model(ModelConfig(name="tiny"), "cpu")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (10, *(loaded.input_resolution,) * 2, 3), dtype=np.uint8)
    captions = [f"a photo of thing {i}" for i in range(10)]
    clean = ClipEncoder(loaded, batch_size=8)
    want_img = clean.encode_images(pixels)
    want_txt, _ = clean.encode_texts(captions)

    monkeypatch.setenv(OOM_ENV, "3")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("clipbatch.encode.encoder")
    log.addHandler(handler)
    try:
        enc = ClipEncoder(loaded, batch_size=8)
        got_img = enc.encode_images(pixels)
        got_txt, _ = enc.encode_texts(captions)
    finally:
        log.removeHandler(handler)
    assert enc.batch_size == 2  # 8 -> 4 -> 2, then kept
    assert got_img.shape == want_img.shape and got_txt.shape == want_txt.shape
    np.testing.assert_allclose(got_img, want_img, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_txt, want_txt, rtol=1e-4, atol=1e-5)
    messages = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any("out of memory at batch 8" in m for m in messages), messages

    monkeypatch.setenv(OOM_ENV, "0")  # even one row fails: that is not recoverable
    with pytest.raises(RuntimeError, match="out of memory"):
        ClipEncoder(loaded, batch_size=4).encode_images(pixels[:2])


def _record(case: str, figures: dict) -> None:
    """Figures for bench/RESULTS.md, when CLIPBATCH_FAULT_FIGURES names a file."""
    path = os.environ.get("CLIPBATCH_FAULT_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"case": case, **figures}, default=str) + "\n")
