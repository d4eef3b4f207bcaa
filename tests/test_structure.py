"""Issue 17: the house rules the layout promises, each checked.

- importing the library changes nothing in the process, and pulls in no Prefect;
- one bounded-window helper: read-ahead that stops, ordered windows that cancel, and
  completion windows that never exceed their size;
- one retry policy per layer: botocore and s3fs make one attempt, clipbatch's layer
  retries, and a stream resumes at its offset after a reset;
- one worker per process and setup: the model, the tokenizer and a learned batch size
  are reused by the next shard;
- brace patterns keep their errors; PIL's global bomb limit is left alone.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from clipbatch.config import StorageOptions, build_config
from clipbatch.errors import ConfigError, TransientIOError
from clipbatch.io.retry import RetryingReader, RetryPolicy, with_retries
from clipbatch.sources.listing import expand_braces
from clipbatch.window import completed, ordered, prefetch

REPO = Path(__file__).resolve().parent.parent


def run_python(code: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_importing_the_library_has_no_side_effects_and_no_prefect() -> None:
    state = run_python(
        "import importlib, json, os, pkgutil, sys\n"
        "from PIL import Image\n"
        "limit = Image.MAX_IMAGE_PIXELS\n"
        "import clipbatch\n"
        "for m in pkgutil.walk_packages(clipbatch.__path__, 'clipbatch.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(json.dumps({'omp': os.environ.get('OMP_WAIT_POLICY'),\n"
        "    'pil': Image.MAX_IMAGE_PIXELS == limit,\n"
        "    'prefect': sorted(m for m in sys.modules if m == 'prefect' or m.startswith('clipbatch_flows'))}))"
    )
    assert state == {"omp": None, "pil": True, "prefect": []}


def test_work_entry_points_apply_the_process_settings() -> None:
    state = run_python(
        "import json, os, sys\n"
        "import clipbatch_tasks  # a Dask or Ray worker imports the task package before torch\n"
        "print(json.dumps({'omp': os.environ.get('OMP_WAIT_POLICY'),\n"
        "                  'torch_first': 'torch' in sys.modules}))"
    )
    assert state == {"omp": "PASSIVE", "torch_first": False}


# -- windows --------------------------------------------------------------------------


def wait_until(condition, what: str, timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


def blocked_in_queue_put(thread: threading.Thread) -> bool:
    """Whether ``thread`` waits inside ``queue.Queue.put`` for room (the queue is full)."""
    frame = sys._current_frames().get(thread.ident)
    while frame is not None and frame.f_back is not None:
        code, caller = frame.f_code, frame.f_back.f_code
        if (
            code.co_name == "wait"
            and code.co_filename.endswith("threading.py")
            and caller.co_name == "put"
            and caller.co_filename.endswith("queue.py")
        ):
            return True
        frame = frame.f_back
    return False


def test_prefetch_reads_ahead_at_most_depth_and_stops_its_producer() -> None:
    produced: list[int] = []
    name = f"prefetch-test-{os.getpid()}-{threading.get_ident()}"

    def source():
        for i in range(1000):
            produced.append(i)
            yield i

    def producer() -> threading.Thread:
        (thread,) = [t for t in threading.enumerate() if t.name == name]
        return thread

    with prefetch(source(), depth=4, name=name) as items:
        assert next(items) == 0
        thread = producer()
        # The producer fills the queue and parks in put() with one more item in hand; from
        # then on it cannot produce anything until the consumer takes an item.
        wait_until(lambda: len(produced) >= 1 + 4 + 1, "the producer to read ahead")
        wait_until(lambda: blocked_in_queue_put(thread), "the producer to block on a full queue")
        assert len(produced) == 1 + 4 + 1  # the one taken, the queue, the one in hand
        assert next(items) == 1  # taking one lets exactly one more in
        wait_until(lambda: len(produced) >= 2 + 4 + 1, "the producer to read one more")
        wait_until(lambda: blocked_in_queue_put(thread), "the producer to block again")
        assert len(produced) == 2 + 4 + 1
    # Leaving the block stops the producer: its thread ends, so nothing more is produced.
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert len(produced) == 2 + 4 + 1 < 1000  # it stopped where it was, and stays stopped


def test_prefetch_hands_a_producer_error_to_the_consumer() -> None:
    def broken():
        yield 1
        raise ValueError("bad row")

    with prefetch(broken(), depth=2) as items, pytest.raises(ValueError, match="bad row"):
        list(items)


def test_ordered_keeps_input_order_and_a_bounded_window() -> None:
    started: list[int] = []
    finished: list[int] = []  # the order the work completed in
    timed_out: list[int] = []
    done = {i: threading.Event() for i in range(21)}
    in_flight = {"now": 0, "max": 0}
    lock = threading.Lock()

    def work(i: int) -> int:
        # Each even item waits for the odd one after it: later items finish first. The odd
        # one is always started before the even one is awaited (the window holds both).
        if i % 2 == 0 and i + 1 < 20 and not done[i + 1].wait(timeout=10):
            timed_out.append(i)
        with lock:
            in_flight["now"] -= 1
            finished.append(i)
        done[i].set()
        return i * i

    with ThreadPoolExecutor(8) as pool:

        def start(i: int) -> Future[int]:
            started.append(i)
            with lock:
                in_flight["now"] += 1
                in_flight["max"] = max(in_flight["max"], in_flight["now"])
            return pool.submit(work, i)

        out = [(i, f.result()) for i, f in ordered(range(20), start, ahead=3)]
    assert timed_out == []
    # Completion order was not input order (each odd item finished before its even one) ...
    assert all(finished.index(i + 1) < finished.index(i) for i in range(0, 20, 2)), finished
    # ... and the output is in input order all the same, with a window of 3.
    assert out == [(i, i * i) for i in range(20)]
    assert started == list(range(20))
    assert in_flight["max"] <= 3


def test_ordered_cancels_what_a_consumer_never_reads() -> None:
    gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        futures: list[Future] = []

        def start(i: int) -> Future:
            futures.append(pool.submit(gate.wait))
            return futures[-1]

        window = ordered(range(10), start, ahead=4)
        next(window)  # the window is full: the first is handed back, not yet done
        window.close()  # the consumer stops early
        gate.set()
    assert sum(f.cancelled() for f in futures) >= 2


def test_completed_never_has_more_than_size_in_flight() -> None:
    running: set[int] = set()
    peak = 0

    def start(i: int) -> int:
        nonlocal peak
        running.add(i)
        peak = max(peak, len(running))
        return i

    def first_done(handles: list[int]) -> int:
        done = max(handles)  # any order: the window, not the order, is the contract
        running.discard(done)
        return done

    seen = [item for item, _ in completed(range(50), start, 4, first_done)]
    assert sorted(seen) == list(range(50)) and peak == 4


# -- retries --------------------------------------------------------------------------


def test_botocore_and_s3fs_make_one_attempt_each() -> None:
    from clipbatch.io.storage import fsspec_kwargs, get_fs

    kwargs = fsspec_kwargs(StorageOptions(endpoint_url="http://127.0.0.1:9"), "s3")
    assert kwargs["config_kwargs"]["retries"] == {"total_max_attempts": 1, "mode": "standard"}
    fs, _ = get_fs("s3://bucket/x", StorageOptions(endpoint_url="http://127.0.0.1:9"))
    assert fs.retries == 1


def test_the_storage_layer_retries_transient_errors_only_then_says_so() -> None:
    calls = {"n": 0}

    def flaky() -> str:
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    policy = RetryPolicy(attempts=5, base_delay=0.001)
    assert with_retries(flaky, "read x", policy) == "ok" and calls["n"] == 3
    calls["n"] = -10
    with pytest.raises(TransientIOError, match="still failing after 5 attempts"):
        with_retries(flaky, "read x", policy)
    with pytest.raises(FileNotFoundError):  # not transient: raised at once
        with_retries(Path("/nonexistent/x").read_bytes, "read x", policy)


class _Resetting(io.BytesIO):
    """A stream that resets its connection once, after ``after`` bytes."""

    resets = 0

    def __init__(self, data: bytes, after: int) -> None:
        super().__init__(data)
        self.after = after

    def read(self, size: int = -1) -> bytes:
        if _Resetting.resets == 0 and self.tell() >= self.after:
            _Resetting.resets += 1
            raise ConnectionResetError("connection reset mid-stream")
        return super().read(size)


def test_a_stream_resumes_at_its_offset_after_a_reset(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    opened = []

    def open_() -> io.BytesIO:
        opened.append(1)
        return _Resetting(data, after=4_000)

    reader = RetryingReader(open_, "read blob", RetryPolicy(attempts=3, base_delay=0.001))
    got = b"".join(iter(lambda: reader.read(1_000), b""))
    assert got == data and len(opened) == 2 and _Resetting.resets == 1


# -- one worker per process -----------------------------------------------------------


def test_one_worker_per_setup_keeps_its_model_tokenizer_and_learned_batch_size(
    tmp_path: Path, monkeypatch, caplog
) -> None:
    from clipbatch.faults import OOM_ENV
    from clipbatch.pipeline.worker import run_plan, worker_for
    from clipbatch.plan.planner import plan_shards
    from clipbatch.process import process_context
    from clipbatch.synthetic import write_webdataset

    write_webdataset(tmp_path / "src", shards=3, per_shard=6, seed=2, size=32)
    config = build_config(
        {
            "source": str(tmp_path / "src"),
            "dest": str(tmp_path / "out"),
            "model": "tiny",
            "runtime": {"device": "cpu", "batch_size": 8, "decode_workers": 1},
        }
    )
    plan = plan_shards(config)
    monkeypatch.setenv(OOM_ENV, "3")  # every forward pass over 3 rows runs out of memory
    loads = process_context().model_loads
    with caplog.at_level(logging.WARNING, logger="clipbatch.encode.encoder"):
        results = run_plan(plan, "run")
    assert [r.rows for r in results] == [6, 6, 6]
    worker = worker_for(plan.config)
    assert worker.encoder.batch_size == 2  # halved 8 -> 4 -> 2 once, then kept
    # The halving happened in the first shard only: later shards started at 2.
    halvings = [r for r in caplog.records if "out of memory" in r.getMessage()]
    assert len(halvings) == 2, [r.getMessage() for r in halvings]
    assert worker_for(plan.config) is worker and process_context().model_loads <= loads + 1


# -- sources and decoding -------------------------------------------------------------


def test_brace_patterns_keep_their_errors() -> None:
    assert expand_braces("s3://b/{00000..00002}.tar") == [
        "s3://b/00000.tar",
        "s3://b/00001.tar",
        "s3://b/00002.tar",
    ]
    assert expand_braces("x/{a,b}/{8..10}") == [
        "x/a/8",
        "x/a/9",
        "x/a/10",
        "x/b/8",
        "x/b/9",
        "x/b/10",
    ]
    with pytest.raises(ConfigError, match=r"cannot expand brace pattern \{abc\}"):
        expand_braces("s3://b/{abc}.tar")
    with pytest.raises(ConfigError, match="Unbalanced"):
        expand_braces("s3://b/{000..010.tar")


def test_decoding_honours_max_image_pixels_with_pils_limit_left_on() -> None:
    from PIL import Image

    from clipbatch.preprocess.decode import DecodeOptions, prepare
    from clipbatch.records import RawSample
    from tests.corpus import bomb_png, encode, picture

    assert Image.MAX_IMAGE_PIXELS is not None  # nobody switched PIL's own check off
    small = encode(picture(5), "PNG")
    for data, limit, status in (
        (bomb_png(), 89_478_485, "too_large"),  # refused by PIL from the header
        (small, 100, "too_large"),  # ours, below PIL's
        (small, 89_478_485, "ok"),
    ):
        raw = RawSample(key="k", source_member="k", image_bytes=data, caption="c")
        prepare(raw, DecodeOptions(32, max_pixels=limit))
        assert raw.status == status, raw.error
        if status == "too_large":
            assert "max_image_pixels" in raw.error
