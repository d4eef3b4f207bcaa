"""Retry what was transient: `retry_failed` fetches again only the rows that failed for a
transient reason, carries every other row over untouched, and rewrites the file through
the commit protocol; permanent failures are never fetched again, and the attempts are
bounded.

A loopback HTTP server (reached through allow_networks 127.0.0.0/8) serves a table of
image URLs: good ones, ones that answer 503 during the first run and 200 after, one that
always answers 503, a 403 and a 404. Every request is counted per URL.
"""

from __future__ import annotations

import http.server
import io
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from clipbatch.config import build_config
from clipbatch.knn.build import build_index
from clipbatch.knn.policy import IndexSettings
from clipbatch.lineage.record import read_run_record
from clipbatch.sink.commits.index import all_records
from clipbatch.sink.schema import decode_metadata, encode_metadata
from clipbatch.sink.writer import read_file_metadata
from clipbatch.tables.table import open_table
from clipbatch.tables.vectors import embedding_matrix
from tests.helpers import cosine

pytestmark = pytest.mark.timeout(300)


class _Server(http.server.BaseHTTPRequestHandler):
    images: dict[str, bytes] = {}
    hits: Counter = Counter()
    healed = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        name = self.path.lstrip("/")
        self.hits[name] += 1
        if name == "forbidden.jpg":
            self.send_error(403, "Forbidden")
        elif name == "missing.jpg":
            self.send_error(404, "Not Found")
        elif name == "stubborn.jpg" or (name.startswith("flaky") and not self.healed.is_set()):
            self.send_error(503, "Service Unavailable")
        else:
            data = self.images[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def _jpeg(colour: tuple[int, int, int], seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = (rng.random((48, 48, 3)) * 60 + np.array(colour) * 0.75).clip(0, 255)
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def server() -> Iterator[type[_Server]]:
    handler = type(
        "Handler", (_Server,), {"images": {}, "hits": Counter(), "healed": threading.Event()}
    )
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]):
        handler.images[f"good{i}.jpg"] = _jpeg(colour, i)
        handler.images[f"flaky{i}.jpg"] = handler.images[f"good{i}.jpg"]  # the same image
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    handler.base = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _table(tmp_path: Path, base: str) -> Path:
    names = [f"good{i}.jpg" for i in range(4)] + [f"flaky{i}.jpg" for i in range(2)]
    names += ["stubborn.jpg", "forbidden.jpg", "missing.jpg"]
    path = tmp_path / "urls.parquet"
    pq.write_table(
        pa.table(
            {
                "key": [n.removesuffix(".jpg") for n in names],
                "image": [f"{base}/{n}" for n in names],
                "caption": [f"a picture called {n}" for n in names],
            }
        ),
        path,
    )
    return path


def _config(table: Path, dest: Path, retry: bool) -> object:
    return build_config(
        {
            "source": {
                "url": str(table),
                "allow_networks": ["127.0.0.0/8"],
                "fetch_retries": 0,
                "fetch_timeout_s": 5,
            },
            "sink": {"url": str(dest)},
            "model": {"name": "tiny"},
            "runtime": {"device": "cpu", "batch_size": 4, "retry_failed": retry, "task_retries": 0},
        }
    )


def _rows(dest: Path) -> dict[str, dict]:
    table = open_table(str(dest)).read_all()
    img, has_img = embedding_matrix(table.column("image_embedding"))
    out = {}
    for i, row in enumerate(table.drop_columns(["image_embedding", "text_embedding"]).to_pylist()):
        row["image_vector"] = img[i] if has_img[i] else None
        out[row["key"]] = row
    return out


def test_transient_rows_are_fetched_again_and_only_they(prefect_harness, server, tmp_path) -> None:
    from clipbatch_flows.embed import embed_dataset

    table, dest = _table(tmp_path, server.base), tmp_path / "emb"
    first = embed_dataset(_config(table, dest, retry=False))
    rows = _rows(dest)
    assert {k: r["status"] for k, r in rows.items()} == {
        **{f"good{i}": "ok" for i in range(4)},
        "flaky0": "fetch_transient",
        "flaky1": "fetch_transient",
        "stubborn": "fetch_transient",
        "forbidden": "fetch_error",  # 403: permanent
        "missing": "not_found",
    }
    assert rows["flaky0"]["image_vector"] is None
    [file] = dest.glob("*.parquet")
    before = file.read_bytes()
    meta = read_file_metadata(str(file))
    assert meta["fetch_attempts"] == {"flaky0": 1, "flaky1": 1, "forbidden": 1, "stubborn": 1}
    index1 = build_index(str(dest), "image", IndexSettings(factory="Flat"))
    assert index1.vectors == 4

    # Without retry_failed, the shard is done: nothing is fetched.
    server.healed.set()
    server.hits.clear()
    again = embed_dataset(_config(table, dest, retry=False))
    assert again["shards_skipped"] == 1 and sum(server.hits.values()) == 0

    # With it: the transient rows only; the 403 and the 404 are never asked for again.
    retried = embed_dataset(_config(table, dest, retry=True))
    assert dict(server.hits) == {"flaky0.jpg": 1, "flaky1.jpg": 1, "stubborn.jpg": 1}
    assert retried["shards_committed"] == 1
    rows2 = _rows(dest)
    for i in range(2):
        assert rows2[f"flaky{i}"]["status"] == "ok"
        assert cosine(rows2[f"flaky{i}"]["image_vector"], rows[f"good{i}"]["image_vector"]) > 0.9999
    assert rows2["stubborn"]["status"] == "fetch_transient"
    assert (
        rows2["forbidden"]["status"] == "fetch_error" and rows2["missing"]["status"] == "not_found"
    )
    # Carried over, not re-encoded: the other rows are the same bytes.
    for key in ("good0", "good3", "forbidden", "missing"):
        old, new = rows[key], rows2[key]
        assert old["image_sha256"] == new["image_sha256"] and old["similarity"] == new["similarity"]
        if old["image_vector"] is not None:
            assert np.array_equal(old["image_vector"], new["image_vector"])
    meta2 = read_file_metadata(str(file))
    assert meta2["fingerprint"] == meta["fingerprint"]  # same inputs: same fingerprint
    assert meta2["fetch_attempts"] == {"forbidden": 1, "stubborn": 2}
    assert meta2["retried"] == {
        "run_id": retried["run_id"],
        "rows": 3,
        "recovered": 2,
        "previous_run": first["run_id"],
    }
    assert file.read_bytes() != before
    # The commit index holds the rewritten file's record; lineage says who retried what.
    latest = [r for r in all_records(open_table(str(dest)).sink()) if r.run_id == retried["run_id"]]
    assert latest and latest[0].counts["ok"] == 6
    record = read_run_record(str(dest), retried["run_id"])
    [output] = record["outputs"]
    assert output["retried"] == {"rows": 3, "recovered": 2}
    # The kNN index sees a new file version and takes the recovered vectors in.
    index2 = build_index(str(dest), "image", IndexSettings(factory="Flat"))
    assert index2.mode == "updated" and index2.vectors == 6

    # The attempts are bounded (max_fetch_attempts 3): one more run tries, the next none.
    server.hits.clear()
    embed_dataset(_config(table, dest, retry=True))
    assert dict(server.hits) == {"stubborn.jpg": 1}
    assert read_file_metadata(str(file))["fetch_attempts"]["stubborn"] == 3
    server.hits.clear()
    version = file.stat().st_mtime_ns
    last = embed_dataset(_config(table, dest, retry=True))
    assert sum(server.hits.values()) == 0 and file.stat().st_mtime_ns == version
    assert last["shards_committed"] == 0


def test_a_table_from_before_fetch_transient_retries_its_fetch_errors(
    prefect_harness, server, tmp_path
) -> None:
    """The previous release wrote every fetch failure as fetch_error, and no attempts:
    those rows count as transient, once per run up to the bound."""
    from clipbatch_flows.embed import embed_dataset

    table, dest = _table(tmp_path, server.base), tmp_path / "emb"
    embed_dataset(_config(table, dest, retry=False))
    [file] = dest.glob("*.parquet")
    # Rewrite the file as the previous release wrote it: one status, no attempt counts.
    data = pq.read_table(file)
    meta = decode_metadata(pq.read_metadata(file).metadata)
    meta.pop("fetch_attempts")
    status = pa.array(
        ["fetch_error" if s == "fetch_transient" else s for s in data.column("status").to_pylist()]
    )
    data = data.set_column(data.schema.get_field_index("status"), "status", status)
    pq.write_table(data.replace_schema_metadata(encode_metadata(meta)), file)
    server.healed.set()
    server.hits.clear()
    embed_dataset(_config(table, dest, retry=True))
    # Every former fetch failure was tried once more: the flaky ones came back, the 403 is
    # permanent now, the 503 stays transient; the 404 was never a fetch failure.
    assert dict(server.hits) == {
        "flaky0.jpg": 1,
        "flaky1.jpg": 1,
        "stubborn.jpg": 1,
        "forbidden.jpg": 1,
    }
    rows = _rows(dest)
    assert rows["flaky0"]["status"] == "ok" and rows["forbidden"]["status"] == "fetch_error"
    assert rows["stubborn"]["status"] == "fetch_transient"
    server.hits.clear()
    embed_dataset(_config(table, dest, retry=True))
    assert dict(server.hits) == {"stubborn.jpg": 1}  # the 403 is not asked for again
