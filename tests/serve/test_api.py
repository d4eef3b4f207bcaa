"""``clipbatch serve``'s API against the app, in process (FastAPI's TestClient).

The table is written by the pipeline itself (tiny model, CPU), with failed rows. What
the server answers is checked against what the pipeline wrote: the same vectors for the
same inputs, the same search results as ``clipbatch search``, the source bytes of each
row's image; and every bad input is a clear 4xx while the server stays up.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from clipbatch.errors import ConfigError
from clipbatch.query.search import search_root
from clipbatch.serve.app import ServerState, create_app
from clipbatch.serve.settings import ServeSettings
from clipbatch.tables.table import open_table
from clipbatch.tables.vectors import embedding_matrix
from tests.helpers import cosine
from tests.serve.tables import embed, tiny_config, webdataset_with_failures

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve")
    webdataset_with_failures(root / "wds")
    embed(tiny_config(str(root / "wds"), str(root / "emb")))
    return root / "emb"


@pytest.fixture(scope="module")
def server(table: Path) -> Iterator[tuple[TestClient, ServerState]]:
    state = ServerState(ServeSettings(root=str(table), max_body_bytes=1 << 20))
    with TestClient(create_app(state.settings, state)) as client:
        yield client, state


def rows_of(table: Path) -> list[dict]:
    data = open_table(str(table)).read_all()
    img, has_img = embedding_matrix(data.column("image_embedding"))
    txt, has_txt = embedding_matrix(data.column("text_embedding"))
    out = data.drop_columns(["image_embedding", "text_embedding"]).to_pylist()
    for i, row in enumerate(out):
        row["image_vector"] = img[i] if has_img[i] else None
        row["text_vector"] = txt[i] if has_txt[i] else None
    return out


def source_image(wds: Path, key: str) -> bytes:
    import tarfile

    for tar_path in sorted(wds.glob("*.tar")):
        with tarfile.open(tar_path) as tar:
            for m in tar:
                if m.name == f"{key}.jpg":
                    return tar.extractfile(m).read()
    raise KeyError(key)


def test_info_names_the_model_as_recorded_and_the_search_method(server) -> None:
    client, _ = server
    info = client.get("/api/info").json()
    assert info["rows"] == 26 and info["tables"] == [""]
    assert info["model"]["name"] == "tiny" and info["model"]["preprocess"] == "exact"
    assert info["model"]["precision"] == "fp32" == info["model"]["recorded_precision"]
    assert info["index"]["kind"] == "brute force"
    assert client.get("/openapi.json").json()["paths"]["/api/search"]["post"]


def test_text_vectors_equal_the_pipelines(server, table: Path) -> None:
    client, _ = server
    rows = [r for r in rows_of(table) if r["text_vector"] is not None][:10]
    got = client.post("/api/encode/text", json={"texts": [r["caption"] for r in rows]}).json()
    assert got["dim"] == 64 and got["truncated"] == [False] * len(rows)
    for row, vector in zip(rows, got["vectors"], strict=True):
        assert cosine(vector, row["text_vector"]) >= 0.9999


def test_image_vectors_equal_the_pipelines(server, table: Path) -> None:
    client, _ = server
    rows = [r for r in rows_of(table) if r["image_vector"] is not None][:6]
    files = [
        ("files", (f"{r['key']}.jpg", source_image(table.parent / "wds", r["key"]), "image/jpeg"))
        for r in rows
    ]
    got = client.post("/api/encode/image", files=files).json()
    for row, vector in zip(rows, got["vectors"], strict=True):
        assert cosine(vector, row["image_vector"]) >= 0.9999


def test_vectors_in_binary_forms(server) -> None:
    client, _ = server
    texts = {"texts": ["a red circle", "a blue square"]}
    as_json = np.array(client.post("/api/encode/text", json=texts).json()["vectors"])
    npy = client.post("/api/encode/text", json=texts, headers={"Accept": "application/x-npy"})
    assert npy.headers["content-type"] == "application/x-npy"
    assert np.allclose(np.load(io.BytesIO(npy.content)), as_json, atol=1e-6)
    import pyarrow as pa

    arrow = client.post(
        "/api/encode/text", json=texts, headers={"Accept": "application/vnd.apache.arrow.stream"}
    )
    table = pa.ipc.open_stream(arrow.content).read_all()
    assert np.allclose(
        np.stack(table.column("vector").to_numpy(zero_copy_only=False)), as_json, atol=1e-6
    )


def test_a_text_past_the_token_limit_is_truncated_and_says_so(server) -> None:
    client, _ = server
    got = client.post("/api/encode/text", json={"texts": ["a " * 200, "short"]}).json()
    assert got["truncated"] == [True, False]


def test_text_search_agrees_with_clipbatch_search(server, table: Path) -> None:
    client, _ = server
    for query in ("a red circle", "a large blue square on the left"):
        hits, _ = search_root(str(table), [query], k=8)
        got = client.post("/api/search", json={"text": query, "k": 8}).json()
        assert got["method"]["kind"] == "brute force"
        assert [h["key"] for h in got["hits"]] == [h.key for h in hits[0]]
        assert np.allclose([h["score"] for h in got["hits"]], [h.score for h in hits[0]], atol=1e-4)


def test_more_like_this_and_filters(server, table: Path) -> None:
    client, _ = server
    rows = rows_of(table)
    ok = next(r for r in rows if r["status"] == "ok")
    got = client.post("/api/search", json={"key": ok["key"], "k": 5}).json()
    keys = [h["key"] for h in got["hits"]]
    assert ok["key"] not in keys and len(keys) == 5
    # The best neighbour by brute force over the stored vectors.
    others = [r for r in rows if r["image_vector"] is not None and r["key"] != ok["key"]]
    best = max(others, key=lambda r: cosine(r["image_vector"], ok["image_vector"]))
    assert keys[0] == best["key"]
    # A similarity range keeps only rows inside it.
    sims = sorted(r["similarity"] for r in rows if r["similarity"] is not None)
    lo = sims[len(sims) // 2]
    ranged = client.post(
        "/api/search", json={"text": "a circle", "k": 50, "min_similarity": lo}
    ).json()
    assert ranged["hits"] and all(h["similarity"] >= lo for h in ranged["hits"])
    # Statuses: failed rows have no image vector, so an image search never returns them.
    failed = client.post(
        "/api/search", json={"text": "a circle", "statuses": ["decode_error"]}
    ).json()
    assert failed["hits"] == []


def test_a_row_and_its_image_are_the_source_bytes(server, table: Path) -> None:
    client, state = server
    for row in rows_of(table)[:4]:
        key = quote(row["key"], safe="")
        detail = client.get(f"/api/rows/{key}").json()
        assert detail["status"] == row["status"] and detail["source_uri"] == row["source_uri"]
        assert detail["model"] == "tiny" and detail["run"]["run_id"] == "test-run"
        image = client.get(detail["image"])
        assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
        assert hashlib.sha256(image.content).digest() == row["image_sha256"]
        # Content-addressed: a client that has it gets a 304.
        again = client.get(detail["image"], headers={"If-None-Match": image.headers["etag"]})
        assert again.status_code == 304
        thumb = client.get(detail["thumbnail"] + "?size=64")
        assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size[0] <= 64


def test_overview_counts_every_row(server) -> None:
    client, _ = server
    got = client.get("/api/overview").json()
    assert got["rows"] == 26
    assert got["by_status"] == {"ok": 24, "missing_image": 1, "decode_error": 1}
    assert got["failed_total"] == 2
    assert sum(got["similarity"]["histogram"]["counts"]) == got["similarity"]["rows"]
    assert {r["status"] for r in got["failed"]} >= {"missing_image", "decode_error"}
    failed = {r["key"]: r for r in got["failed"]}
    assert "not an image" in failed["zz-not-an-image"]["error"]
    assert failed["zz-no-image"]["image"].startswith("/api/image/zz-no-image")


@pytest.mark.parametrize(
    ("path", "method", "kwargs", "status", "says"),
    [
        ("/api/encode/text", "post", {"json": {"texts": []}}, 422, "at least one"),
        ("/api/encode/text", "post", {"json": {"texts": ["ok", "  "]}}, 422, "empty"),
        (
            "/api/encode/image",
            "post",
            {"files": [("files", ("x.jpg", b"not an image", "image/jpeg"))]},
            400,
            "decode_error",
        ),
        (
            "/api/encode/image",
            "post",
            {"files": [("files", ("x.jpg", b"", "image/jpeg"))]},
            400,
            "empty",
        ),
        ("/api/search", "post", {"json": {}}, 400, "exactly one"),
        ("/api/search", "post", {"json": {"text": "x", "k": 0}}, 422, "greater than"),
        ("/api/rows/no-such-key", "get", {}, 404, "no row"),
        ("/api/rows/..%2F..%2Fetc%2Fpasswd", "get", {}, 404, "no row"),
        ("/api/image/000000000?table=..%2F..", "get", {}, 404, "no row"),
        (
            "/api/search",
            "post",
            {"json": {"text": "x", "partitions": ["../../etc"]}},
            404,
            "no partition",
        ),
    ],
)
def test_bad_input_is_a_clear_4xx(server, path, method, kwargs, status, says) -> None:
    client, _ = server
    response = getattr(client, method)(path, **kwargs)
    assert response.status_code == status, response.text
    assert says in response.text
    assert client.get("/health").json() == {"status": "ok"}  # still up


def test_an_oversized_body_and_a_decompression_bomb(server) -> None:
    client, state = server
    big = b"\xff\xd8\xff" + b"0" * (2 << 20)
    response = client.post("/api/encode/image", files=[("files", ("big.jpg", big, "image/jpeg"))])
    assert response.status_code == 413 and "larger than" in response.text
    # Few bytes, many pixels: refused from the header, never decoded.
    buf = io.BytesIO()
    Image.new("L", (10_000, 6_000)).save(buf, "PNG")
    assert len(buf.getvalue()) < (1 << 20)
    response = client.post(
        "/api/encode/image", files=[("files", ("bomb.png", buf.getvalue(), "image/png"))]
    )
    assert response.status_code == 413 and "too_large" in response.text
    assert client.get("/health").status_code == 200


def test_image_search_finds_the_image_itself_first(server, table: Path) -> None:
    client, _ = server
    row = next(r for r in rows_of(table) if r["status"] == "ok")
    data = source_image(table.parent / "wds", row["key"])
    got = client.post(
        "/api/search/image", files={"file": ("q.jpg", data, "image/jpeg")}, data={"k": "3"}
    ).json()
    assert got["hits"][0]["key"] == row["key"] and got["hits"][0]["score"] > 0.999


def test_binding_beyond_loopback_needs_a_token(table: Path) -> None:
    with pytest.raises(ConfigError, match="token"):
        ServeSettings(root=str(table), host="0.0.0.0").check()
    ServeSettings(root=str(table), host="0.0.0.0", token="s3cret-token").check()


def test_with_a_token_every_request_but_health_needs_it(server, table: Path) -> None:
    _, state = server
    settings = ServeSettings(root=str(table), token="s3cret-token")
    with TestClient(create_app(settings, state)) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/api/info").status_code == 401
        assert client.get("/api/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        ok = client.get("/api/info", headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
        page = client.get("/?token=s3cret-token", follow_redirects=False)
        assert page.status_code == 303 and "clipbatch_token" in page.headers["set-cookie"]
        assert client.get("/api/info").status_code == 200  # the cookie now


def test_cors_is_off_unless_asked(server, table: Path) -> None:
    client, state = server
    response = client.get("/api/info", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in response.headers
    settings = ServeSettings(root=str(table), cors_origins=("https://app.example",))
    with TestClient(create_app(settings, state)) as cors:
        r = cors.get("/api/info", headers={"Origin": "https://app.example"})
        assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_the_server_only_reads_the_table(server, table: Path) -> None:
    client, _ = server
    before = {p: p.stat().st_mtime_ns for p in table.rglob("*") if p.is_file()}
    client.post("/api/search", json={"text": "anything"})
    client.get("/api/overview")
    after = {p: p.stat().st_mtime_ns for p in table.rglob("*") if p.is_file()}
    assert before == after
    assert json.loads(json.dumps(client.get("/api/info").json()))["rows"] == 26
    assert pq.read_metadata(next(table.glob("*.parquet"))).num_rows > 0


def test_a_row_whose_bytes_are_not_an_image_gets_a_json_415_thumbnail(server) -> None:
    client, _ = server
    detail = client.get("/api/rows/zz-not-an-image").json()
    assert detail["status"] == "decode_error"
    response = client.get(detail["thumbnail"])
    assert response.status_code == 415 and "no thumbnail" in response.json()["detail"]
    original = client.get(detail["image"])  # the source bytes are still what the row saw
    assert original.status_code == 200 and original.content == b"this is not a jpeg"
    failed = {r["key"]: r for r in client.get("/api/overview").json()["failed"]}
    assert failed["zz-not-an-image"]["has_image"] and not failed["zz-no-image"]["has_image"]


def test_image_search_takes_a_similarity_range(server, table: Path) -> None:
    client, _ = server
    row = next(r for r in rows_of(table) if r["status"] == "ok")
    data = source_image(table.parent / "wds", row["key"])
    lo = row["similarity"] + 1e-4  # excludes the image itself
    got = client.post(
        "/api/search/image",
        files={"file": ("q.jpg", data, "image/jpeg")},
        data={"k": "5", "min_similarity": str(lo)},
    ).json()
    assert got["hits"] and all(h["similarity"] >= lo for h in got["hits"])
    assert row["key"] not in {h["key"] for h in got["hits"]}


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b'{"texts": ["a red circle", "a blue square"]}', {}),
        (b'{"texts": ["a red circle"]}', {"Accept": "application/x-npy"}),
        (b'{"texts": ["a red circle"]}', {"Accept": "application/vnd.apache.arrow.stream"}),
        (json.dumps({"texts": ["a " * 200]}).encode(), {}),
        (b'{"texts": []}', {}),
        (b'{"texts": ["ok", "  "]}', {}),
        (b'{"texts": "a red circle"}', {}),
        (b'{"texts": ["a"], "more": 1}', {}),
        (b'{"texts": ["a", 3]}', {}),
        (b"not json", {}),
        (b'{"texts": ["a red circle"]}', {"Content-Type": "text/plain"}),
        (json.dumps({"texts": ["x"] * 1025}).encode(), {}),
    ],
    ids=[
        "json",
        "npy",
        "arrow",
        "truncated",
        "none",
        "blank",
        "a-string",
        "more-keys",
        "a-number",
        "not-json",
        "not-json-type",
        "too-many",
    ],  # fmt: skip
)
def test_the_encode_fast_path_answers_as_the_route_does(server, body, headers) -> None:
    client, state = server
    with TestClient(create_app(state.settings, state, fast_path=False)) as route:
        sent = {"Content-Type": "application/json", **headers}
        fast = client.post("/api/encode/text", content=body, headers=sent)
        slow = route.post("/api/encode/text", content=body, headers=sent)
    assert (fast.status_code, fast.content) == (slow.status_code, slow.content)
    for name in ("content-type", "x-clipbatch-model", "x-clipbatch-checkpoint"):
        assert fast.headers.get(name) == slow.headers.get(name)


def test_the_fast_path_answers_well_formed_requests_itself_and_passes_on_the_rest(
    server,
) -> None:
    """The middleware alone, before an app that records what reaches it."""
    import asyncio
    import functools

    from clipbatch.serve.app import text_vectors_response
    from clipbatch.serve.fastpath import EncodeTextFastPath

    _, state = server
    reached: list[bytes] = []

    async def route(scope: dict, receive, send) -> None:  # noqa: ANN001 - ASGI
        message = await receive()
        reached.append(message["body"])
        await send({"type": "http.response.start", "status": 299, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    respond = functools.partial(text_vectors_response, state=state)
    fast = EncodeTextFastPath(route, state=state, max_texts=4, respond=respond)

    def post(body: bytes, chunk: int = 5) -> int:
        pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
        messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
                    for i, p in enumerate(pieces)]  # fmt: skip
        sent: list[dict] = []

        async def receive() -> dict:
            return messages.pop(0)

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/api/encode/text",
                 "headers": [(b"content-type", b"application/json")]}  # fmt: skip
        asyncio.run(fast(scope, receive, send))
        return sent[0]["status"]

    assert post(b'{"texts": ["a red circle"]}') == 200 and reached == []
    too_many = json.dumps({"texts": ["x"] * 5}).encode()
    for bad in (b'{"texts": [""]}', too_many, b"{"):
        assert post(bad) == 299
        assert reached[-1] == bad  # the whole body, read in pieces, replayed
