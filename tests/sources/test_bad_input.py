"""Issue 4 acceptance: every bad-input case, on every source kind, through the full flow.

One flow run per layout (webdataset, folder, table) over a corpus that holds every
case (tests/corpus.py), on S3 served by moto; URLs are served by a local http.server.
Each row must carry its exact status and a readable error, good rows in the same shard
must equal stock clip's embeddings, and every input row must yield exactly one row.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbatch.io.storage import get_fs
from clipbatch.models.loading import load_model
from tests.conftest import upload_dir
from tests.corpus import (
    Expect,
    write_folder_corpus,
    write_table_corpus,
    write_webdataset_corpus,
)
from tests.helpers import cosine, no_vector, read_table, tiny_s3_config

pytestmark = pytest.mark.timeout(240)

# Statuses whose rows keep no image embedding / no text embedding.
NO_IMAGE = {
    "decode_error",
    "too_large",
    "missing_image",
    "fetch_error",
    "fetch_transient",
    "not_found",
    "duplicate_key",
    "unsafe_path",
    "shard_damaged",
    "bad_row",
}
NO_TEXT = {"missing_caption", "empty_caption", "caption_decode_error", "duplicate_key"}
NO_TEXT |= {"unsafe_path", "shard_damaged", "bad_row"}


_hits: dict[str, int] = {}
_lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    root: Path = Path("/nonexistent")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        # The client gives up on /slow.jpg (the timeout case): a broken pipe is expected.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self._get()

    def _get(self) -> None:
        if self.path == "/slow.jpg":
            time.sleep(3)  # longer than the fetch timeout, every time
        name = self.path.lstrip("/")
        if name == "flaky.jpg":
            with _lock:
                _hits[name] = _hits.get(name, 0) + 1
                first = _hits[name] == 1
            if first:
                self.send_error(503, "Service Unavailable")
                return
            name = "good.jpg"
        path = self.root / name
        if not path.is_file():
            self.send_error(404, "Not Found")
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def http_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """(base URL, folder it serves) of a loopback HTTP server; /slow.jpg never answers in time."""
    root = tmp_path_factory.mktemp("http")
    handler = type("Handler", (_Handler,), {"root": root})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def make_config(source: dict, dest: str, endpoint: str, **runtime):
    return tiny_s3_config(source, dest, endpoint, decode_workers=2, **runtime)


@pytest.fixture(scope="module")
def clip_ref():
    """Stock clip on the tiny checkpoint: reference image and text embeddings."""
    import clip
    import torch
    from PIL import Image

    from clipbatch.config import ModelConfig

    loaded = load_model(ModelConfig(name="tiny"), "cpu")

    def image(png: bytes) -> np.ndarray:
        with torch.no_grad():
            x = loaded.preprocess(Image.open(io.BytesIO(png))).unsqueeze(0)
            return loaded.model.encode_image(x).float().numpy()[0]

    def text(caption: str) -> np.ndarray:
        with torch.no_grad():
            tokens = clip.tokenize([caption], truncate=True)
            return loaded.model.encode_text(tokens).float().numpy()[0]

    return image, text


def check_rows(rows: list[dict], expected: dict[str, Expect], clip_ref) -> None:
    """Exact status per case; good rows equal stock clip; one output row per input row."""
    ref_image, ref_text = clip_ref
    by_key = {r["key"]: r for r in rows}
    assert len(by_key) == len(rows), "keys must be unique"
    assert sorted(by_key) == sorted(expected), "every input row yields exactly one output row"
    for key, exp in expected.items():
        row = by_key[key]
        where = f"{key}: {row['status']} {row['error']}"
        assert row["status"] == exp.status, where
        if exp.status == "ok":
            assert row["error"] is None, where
        else:
            assert row["error"] and len(row["error"]) > 5, where
        if exp.error_has:
            assert exp.error_has in row["error"], where
        if exp.ref_png is not None:
            assert not no_vector(row["image_embedding"]), where
            got = np.asarray(row["image_embedding"], np.float32)
            assert cosine(got, ref_image(exp.ref_png)) > 0.999, where
        if exp.status in NO_IMAGE:
            assert no_vector(row["image_embedding"]), where
        if exp.caption is not None:
            assert row["caption"] == exp.caption, where
            got = np.asarray(row["text_embedding"], np.float32)
            assert cosine(got, ref_text(exp.caption)) > 0.999, where
        if exp.status in NO_TEXT:
            assert no_vector(row["text_embedding"]), where
        if exp.truncated is not None:
            assert row["caption_truncated"] is exp.truncated, where
        if exp.size is not None:
            assert (row["width"], row["height"]) == exp.size, where
        if not no_vector(row["image_embedding"]) and not no_vector(row["text_embedding"]):
            assert row["similarity"] is not None, where
        for column, value in exp.extra.items():
            assert row[column] == value, f"{where}: {column}"


def test_webdataset_bad_inputs_and_error_ratio(
    prefect_harness, tmp_path, s3_bucket, s3_endpoint, clip_ref
):
    from clipbatch_flows.embed import embed_dataset

    expected = write_webdataset_corpus(tmp_path / "wds")
    source = upload_dir(tmp_path / "wds", s3_bucket, "wds", s3_endpoint)
    dest = f"s3://{s3_bucket}/out"
    shard0 = {k: e for k, e in expected.items() if k not in ("d0", "d1", "00001/__damaged__")}
    failed0 = sum(e.status != "ok" for e in shard0.values())
    assert failed0 / len(shard0) > 0.4 and 2 / 3 > 0.4 >= 1 / 3
    config = make_config({"url": source}, dest, s3_endpoint, max_error_ratio=0.4)
    with pytest.raises(Exception) as failure:
        embed_dataset(config)
    # Shard 00000 is above the error budget: it fails, naming its counts ...
    message = str(failure.value)
    assert f"{failed0} of {len(shard0)} rows failed" in message and "00000" in message
    # ... and its rows are still written, like those of the damaged (but passing) shard.
    table, files = read_table(dest, s3_endpoint)
    assert files == ["00000.parquet", "00001.parquet"]
    check_rows(table.to_pylist(), expected, clip_ref)
    assert_inspect_consistent(dest, s3_endpoint)


def assert_inspect_consistent(dest: str, endpoint: str) -> None:
    """`clipbatch inspect` accepts a table full of bad rows: their kept vectors are by rule."""
    from clipbatch_flows.cli.main import main as cli

    assert cli(["inspect", dest, "--endpoint-url", endpoint]) == 0


def test_folder_bad_inputs(prefect_harness, tmp_path, s3_bucket, s3_endpoint, clip_ref):
    from clipbatch_flows.embed import embed_dataset

    expected = write_folder_corpus(tmp_path / "imgs")
    source = upload_dir(tmp_path / "imgs", s3_bucket, "imgs", s3_endpoint)
    dest = f"s3://{s3_bucket}/out"
    config = make_config({"url": source, "folder_shard_size": 8}, dest, s3_endpoint)
    summary = embed_dataset(config)
    table, files = read_table(dest, s3_endpoint)
    assert files == ["folder-00000.parquet", "folder-00001.parquet", "folder-00002.parquet"]
    assert summary["rows_written"] == table.num_rows == len(expected)
    rows = table.to_pylist()
    check_rows(rows, expected, clip_ref)
    assert {r["source_uri"] for r in rows} == {source}
    assert_inspect_consistent(dest, s3_endpoint)


def test_table_bad_inputs(prefect_harness, tmp_path, s3_bucket, s3_endpoint, http_root, clip_ref):
    from clipbatch_flows.embed import embed_dataset

    http_base, served = http_root
    s3_base = f"s3://{s3_bucket}/tbl"
    expected = write_table_corpus(tmp_path / "tbl", http_base, s3_base)
    (served / "good.jpg").write_bytes((tmp_path / "tbl" / "images" / "good.jpg").read_bytes())
    source = upload_dir(tmp_path / "tbl", s3_bucket, "tbl", s3_endpoint)
    dest = f"s3://{s3_bucket}/out"
    config = make_config(
        {
            "url": source,
            "kind": "table",  # a table beside its images folder is ambiguous to detect
            "key_column": "id",
            "table_shard_rows": 6,
            "fetch_timeout_s": 0.5,
            "fetch_retries": 1,
            "allow_networks": ["127.0.0.1/32"],  # the corpus's URLs are on loopback
        },
        dest,
        s3_endpoint,
    )
    start = time.monotonic()
    summary = embed_dataset(config)
    assert time.monotonic() - start < 90  # a URL that never answers does not hang the shard
    # The three tables carry different passthrough columns, so read the files one by one.
    fs, path = get_fs(dest, config.sink.storage)
    files = sorted(
        p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False) if p.endswith(".parquet")
    )
    rows = [r for f in files for r in pq.read_table(f"{path}/{f}", filesystem=fs).to_pylist()]
    assert files == [
        "data-00000.parquet",
        "data-00001.parquet",
        "data-00002.parquet",
        "manifest.parquet",
        "rows.parquet",
    ]
    assert summary["rows_written"] == len(rows) == len(expected)
    check_rows(rows, expected, clip_ref)
    # Passthrough columns keep stable types: Parquet's own, strings for CSV and JSONL.
    assert pq.read_schema(f"{path}/data-00001.parquet", filesystem=fs).field("score").type == (
        pa.float64()
    )
    manifest_schema = pq.read_schema(f"{path}/manifest.parquet", filesystem=fs)
    assert manifest_schema.field("note").type == pa.string()
    assert manifest_schema.field("image").type == pa.string()
    assert_inspect_consistent(dest, s3_endpoint)


def test_image_only_and_caption_only(prefect_harness, tmp_path, s3_bucket, s3_endpoint, clip_ref):
    """No 'missing_caption' where a dataset has no captions, no 'missing_image' where no images."""
    from clipbatch_flows.embed import embed_dataset

    from tests.corpus import decoded_rgb, encode, picture

    ref_image, ref_text = clip_ref
    imgs = tmp_path / "imgonly"
    imgs.mkdir()
    good = [encode(picture(90 + i), "JPEG", quality=92) for i in range(2)]
    for i, g in enumerate(good):
        (imgs / f"p{i}.jpg").write_bytes(g)
    (imgs / "p2.jpg").write_bytes(b"not an image")
    (imgs / "p0.txt").write_bytes(b"ignored: captions are switched off")
    source = upload_dir(imgs, s3_bucket, "imgonly", s3_endpoint)
    dest = f"s3://{s3_bucket}/out-img"
    embed_dataset(make_config({"url": source, "caption_ext": None}, dest, s3_endpoint))
    rows = {r["key"]: r for r in read_table(dest, s3_endpoint)[0].to_pylist()}
    assert {k: r["status"] for k, r in rows.items()} == {
        "p0": "ok",
        "p1": "ok",
        "p2": "decode_error",
    }
    for i in range(2):
        row = rows[f"p{i}"]
        assert row["caption"] is None and no_vector(row["text_embedding"])
        assert row["similarity"] is None and row["caption_truncated"] is None
        emb = np.asarray(row["image_embedding"], np.float32)
        assert cosine(emb, ref_image(decoded_rgb(good[i]))) > 0.999

    caps = tmp_path / "caponly"
    caps.mkdir()
    (caps / "captions.jsonl").write_text(
        '{"caption": "a red circle"}\n{"caption": ""}\n{"other": 1}\n'
    )
    source = upload_dir(caps, s3_bucket, "caponly", s3_endpoint)
    dest = f"s3://{s3_bucket}/out-cap"
    embed_dataset(make_config({"url": source, "image_column": None}, dest, s3_endpoint))
    rows = {r["key"]: r for r in read_table(dest, s3_endpoint)[0].to_pylist()}
    assert {k: r["status"] for k, r in rows.items()} == {
        "captions/0": "ok",
        "captions/1": "empty_caption",
        "captions/2": "missing_caption",
    }
    row = rows["captions/0"]
    assert no_vector(row["image_embedding"]) and row["image_sha256"] is None
    assert cosine(np.asarray(row["text_embedding"], np.float32), ref_text("a red circle")) > 0.999


def test_gpu_preprocessing_keeps_every_case(prefect_harness, tmp_path, clip_ref):
    """preprocess='gpu' sends plain JPEGs through the batched device decoder (on a CPU
    device, torchvision's CPU decoder: the same code path) and everything else through the
    CPU: every case still gets its exact status, and good rows match stock clip."""
    from clipbatch_flows.embed import embed_dataset

    from clipbatch.config import build_config

    expected = write_webdataset_corpus(tmp_path / "wds")
    dest = tmp_path / "out"
    config = build_config(
        {
            "source": {"url": str(tmp_path / "wds"), "kind": "webdataset"},
            "sink": {"url": str(dest)},
            "model": {"name": "tiny"},
            "runtime": {"device": "cpu", "preprocess": "gpu", "batch_size": 4, "task_retries": 0},
        }
    )
    summary = embed_dataset(config)
    assert summary["shards_committed"] == 2
    table, files = read_table(str(dest))
    assert files == ["00000.parquet", "00001.parquet"]
    check_rows(table.to_pylist(), expected, clip_ref)
    meta = json.loads(pq.read_metadata(dest / "00000.parquet").metadata[b"clipbatch"])
    assert meta["preprocessing"]["mode"] == "gpu"
