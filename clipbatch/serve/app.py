"""``clipbatch serve``: the table's two encoders as an API, search, rows' images, a page.

The app answers for one root (a table, or a partition root of nightly tables):

| method and path | what |
|---|---|
| ``GET /api/info`` | the root, its tables and rows, the model as recorded, the index, the scores |
| ``GET /api/overview`` | rows by status, the similarity histogram, failed rows |
| ``POST /api/encode/text`` | ``{"texts": [...]}`` -> vectors (JSON, npy or Arrow) |
| ``POST /api/encode/image`` | images (multipart ``files``) -> vectors |
| ``POST /api/search`` | ``{"text": ...}`` or ``{"key": ..., "table": ...}`` (more like this), filters |
| ``POST /api/search/image`` | an uploaded image (multipart ``file``) as the query |
| ``GET /api/rows/{key}`` | a row: status, error, source object and version, model, run |
| ``GET /api/image/{key}``, ``GET /api/thumbnail/{key}`` | the row's source image, or a thumbnail |
| ``GET /api/duplicates`` | near-duplicate pairs from ``clipbatch dedup`` |
| ``GET /`` | the page |

Keys go in the path percent-encoded (they hold ``/`` and ``#``); ``?table=`` names the
partition of a partition root. The OpenAPI description is at ``/openapi.json``.

Example::

    from clipbatch.serve.app import create_app
    from clipbatch.serve.settings import ServeSettings

    app = create_app(ServeSettings(root="./clipbatch-demo/embeddings"))
    # uvicorn.run(app, host="127.0.0.1", port=8765)
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import io
import logging
import time
from importlib import resources
from typing import Annotated, Any
from urllib.parse import parse_qsl, quote

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware import Middleware
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field, ValidationError, field_validator

from clipbatch import __version__
from clipbatch.errors import ClipbatchError, ConfigError
from clipbatch.io.storage import get_fs, join
from clipbatch.query.model import Recorded, TableModel
from clipbatch.records import OK, TOO_LARGE
from clipbatch.serve.batching import DynamicBatcher
from clipbatch.serve.catalog import RowNotFound, UnknownJudgement, parse_score_filter
from clipbatch.serve.fastpath import EncodeTextFastPath
from clipbatch.serve.images import THUMBNAIL_SIZES, ImageService, NotAnImageError
from clipbatch.serve.search import RootSearch
from clipbatch.serve.settings import ServeSettings
from clipbatch.tables.row_images import NoImageError, RowImageError, RowImages, SourceChangedError

log = logging.getLogger(__name__)

NPY = "application/x-npy"
ARROW = "application/vnd.apache.arrow.stream"
TOKEN_COOKIE = "clipbatch_token"
MAX_K = 1000


# -- request bodies -----------------------------------------------------------------------


class TextsIn(BaseModel):
    texts: list[str] = Field(..., description="Texts to encode, at least one.")

    @field_validator("texts")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one text")
        for i, text in enumerate(value):
            if not text.strip():
                raise ValueError(f"text {i} is empty")
        return value


class SearchIn(BaseModel):
    text: str | None = Field(None, description="A text query.")
    key: str | None = Field(None, description="An existing row: more like this one.")
    table: str | None = Field(None, description="The row's partition (a partition root).")
    k: int = Field(24, ge=1, le=MAX_K)
    statuses: list[str] | None = Field(None, description="Only rows with these statuses.")
    partitions: list[str] | None = Field(None, description="Only rows of these partitions.")
    min_similarity: float | None = Field(None, ge=-1, le=1)
    max_similarity: float | None = Field(None, ge=-1, le=1)
    scores: list[str] | None = Field(
        None,
        description="Score filters, NAME>=VALUE or NAME<=VALUE, e.g. aesthetic-laion-v2>=5 "
        "(GET /api/info lists the scores this root has).",
        examples=[["aesthetic-laion-v2>=5", "nsfw-laion-l14<=0.2"]],
    )
    unique: str | None = Field(
        None,
        description="A SemDeDup grouping (e.g. semdedup-0.05): only each duplicate "
        "group's first row, and rows in no group.",
    )

    @field_validator("scores")
    @classmethod
    def _score_filters(cls, value: list[str] | None) -> list[str] | None:
        for text in value or []:
            parse_score_filter(text)  # a ValueError is a 422 naming the filter
        return value


# -- the server's state ---------------------------------------------------------------------


class ServerState:
    """What the server loads once: the rows, the index, the model, the batchers."""

    def __init__(self, settings: ServeSettings) -> None:
        settings.check()
        self.settings = settings
        self.search = RootSearch(settings.root, settings.storage, settings.use_index)
        catalog = self.search.catalog
        first = next(f.metadata for f in catalog.files if f.metadata.get("model"))
        self.model = TableModel(
            Recorded.of(first), settings.device, settings.storage,
            max_image_pixels=settings.max_image_pixels,
        )  # fmt: skip
        wait = settings.max_wait_ms / 1000
        self.texts = DynamicBatcher(self._encode_texts, settings.max_batch, wait, "encode-text")
        self.images = DynamicBatcher(self._encode_images, settings.max_batch, wait, "encode-image")
        self.image_service = ImageService(
            RowImages(settings.storage, settings.allow_networks), settings.thumbnail_cache_bytes
        )

    def _encode_texts(self, texts: list[str]) -> list[tuple[np.ndarray, bool]]:
        vectors, truncated = self.model.encode_texts(texts)
        return list(zip(vectors, truncated, strict=True))

    def _encode_images(self, rows: list[Any]) -> list[np.ndarray]:
        return list(self.model.encode_prepared(rows))

    def close(self) -> None:
        self.texts.close()
        self.images.close()


# -- the app --------------------------------------------------------------------------------


def create_app(
    settings: ServeSettings, state: ServerState | None = None, fast_path: bool = True
) -> FastAPI:
    """The app for ``settings.root``; loads rows, index and model now (seconds). A
    ``state`` given is shared (several apps, one model), and left open at shutdown.
    ``fast_path`` False: every request through FastAPI (:mod:`clipbatch.serve.fastpath`).

    Example::

        import uvicorn

        from clipbatch.serve.app import create_app
        from clipbatch.serve.settings import ServeSettings

        uvicorn.run(create_app(ServeSettings(root="emb/")), host="127.0.0.1", port=8765)
    """
    owned = state is None
    state = state or ServerState(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        yield
        if owned:
            state.close()

    app = FastAPI(
        title="clipbatch serve",
        version=__version__,
        description="A clipbatch table's encoders, search and rows (read-only).",
        lifespan=lifespan,
    )
    app.state.server = state
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.token:
        app.add_middleware(BearerToken, token=settings.token)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    _errors(app)
    _routes(app, state)
    if fast_path:  # innermost of the middlewares: after the token and the body limit
        app.user_middleware.append(
            Middleware(
                EncodeTextFastPath,
                state=state,
                max_texts=settings.max_texts,
                respond=functools.partial(text_vectors_response, state=state),
            )
        )
    static = resources.files("clipbatch.serve").joinpath("static")
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    return app


def _errors(app: FastAPI) -> None:
    def handler(status: int):
        async def handle(_: Request, exc: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(exc)}, status_code=status)

        return handle

    app.add_exception_handler(RowNotFound, handler(404))
    app.add_exception_handler(UnknownJudgement, handler(400))
    app.add_exception_handler(NoImageError, handler(404))
    app.add_exception_handler(SourceChangedError, handler(409))
    app.add_exception_handler(NotAnImageError, handler(415))
    app.add_exception_handler(RowImageError, handler(502))
    app.add_exception_handler(ConfigError, handler(400))
    app.add_exception_handler(ClipbatchError, handler(400))


def _routes(app: FastAPI, state: ServerState) -> None:
    catalog = state.search.catalog
    settings = state.settings

    def links(i: int) -> dict[str, str]:
        info = catalog.file(i)
        key = quote(catalog.rows.column("key")[i].as_py(), safe="")
        table = f"?table={quote(info.table, safe='')}" if len(catalog.tables) > 1 else ""
        return {
            "url": f"/api/rows/{key}{table}",
            "image": f"/api/image/{key}{table}",
            "thumbnail": f"/api/thumbnail/{key}{table}",
        }

    def hit(i: int, score: float) -> dict[str, Any]:
        row = catalog.rows
        return {
            "key": row.column("key")[i].as_py(),
            "table": catalog.file(i).table,
            "caption": row.column("caption")[i].as_py(),
            "score": round(score, 6),
            "status": row.column("status")[i].as_py(),
            "similarity": row.column("similarity")[i].as_py(),
            "has_image": row.column("image_sha256")[i].is_valid,
            "scores": catalog.scores_of(i),
            **links(i),
        }

    @app.get("/health", include_in_schema=False)
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/", include_in_schema=False)
    def page(token: str | None = None) -> Response:
        if token is not None:  # a link with the token: keep it as a cookie, drop it from the URL
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response
        html = resources.files("clipbatch.serve").joinpath("static", "index.html").read_text()
        return HTMLResponse(html)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        """The root, its tables, the model as recorded and as served, and the index."""
        index = state.search.index
        return {
            "root": settings.root,
            "tables": catalog.tables,
            "rows": len(catalog),
            "files": len(catalog.files),
            "model": state.model.describe(),
            "index": {
                "kind": "knn" if index is not None else "brute force",
                "detail": state.search.method().detail,
                "stale": bool(state.search.staleness and state.search.staleness.stale),
            },
            "judgements": catalog.judgements(),
            "batching": {"max_items": settings.max_batch, "max_wait_ms": settings.max_wait_ms},
            "limits": {
                "max_body_bytes": settings.max_body_bytes,
                "max_image_pixels": settings.max_image_pixels,
                "max_texts": settings.max_texts,
                "max_k": MAX_K,
            },
        }

    @app.get("/api/overview")
    def overview(failed: Annotated[int, Query(ge=0, le=10_000)] = 100) -> dict[str, Any]:
        """Rows by status and partition, a histogram of caption-image similarity, and the
        failed rows with their errors."""
        out = catalog.overview(failed_limit=failed)
        for row in out["failed"]:
            i = catalog.find(row["key"], row["table"])
            row.update(links(i), has_image=catalog.rows.column("image_sha256")[i].is_valid)
        return out

    @app.post("/api/encode/text")
    async def encode_text(body: TextsIn, request: Request) -> Response:
        """Text vectors from the table's own model (L2-normalised); a text past the token
        limit is truncated, and ``truncated`` says so."""
        if len(body.texts) > settings.max_texts:
            raise HTTPException(413, f"at most {settings.max_texts} texts per request")
        results = await state.texts.submit_async(body.texts)
        return text_vectors_response(request.headers.get("accept", ""), results, state)

    @app.post("/api/encode/image")
    async def encode_image(
        request: Request, files: Annotated[list[UploadFile], File(description="images")]
    ) -> Response:
        """Image vectors from the table's own model, preprocessed as the table recorded."""
        datas = [await f.read() for f in files]
        rows = _decoded(state, datas, [f.filename or f"file {i}" for i, f in enumerate(files)])
        vectors = np.stack(await state.images.submit_async(rows))
        sizes = [{"width": r.width, "height": r.height} for r in rows]
        accept = request.headers.get("accept", "")
        return _vectors_response(accept, vectors, {"images": sizes}, state)

    def run_search(q: np.ndarray, params: SearchIn, exclude: int | None) -> dict[str, Any]:
        mask = catalog.mask(
            params.statuses,
            params.partitions,
            params.min_similarity,
            params.max_similarity,
            params.scores,
            params.unique,
        )
        start = time.perf_counter()
        found, method = state.search.search(q[None, :], params.k, mask, exclude)
        search_ms = (time.perf_counter() - start) * 1000
        return {
            "method": method.as_dict(),
            "search_ms": round(search_ms, 3),
            "hits": [hit(i, s) for i, s in found[0]],
        }

    @app.post("/api/search")
    async def search(params: SearchIn) -> dict[str, Any]:
        """Top-k rows for a text, or for an existing row's image ("more like this"), with
        the kNN index when there is one (``method`` says which, and whether it is stale)."""
        if (params.text is None) == (params.key is None):
            raise HTTPException(400, "give exactly one of text or key")
        start = time.perf_counter()
        exclude = None
        if params.text is not None:
            if not params.text.strip():
                raise HTTPException(400, "the text is empty")
            [(q, truncated)] = await state.texts.submit_async([params.text])
            query: dict[str, Any] = {"text": params.text, "truncated": bool(truncated)}
        else:
            exclude = catalog.find(params.key, params.table)
            q = state.search.row_vector(exclude)
            query = {"key": params.key, "table": catalog.file(exclude).table}
        encode_ms = (time.perf_counter() - start) * 1000
        out = run_search(q, params, exclude)
        return {"query": query, "encode_ms": round(encode_ms, 3), **out}

    @app.post("/api/search/image")
    async def search_image(
        file: Annotated[UploadFile, File(description="the query image")],
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 24,
        statuses: Annotated[str | None, Form(description="comma-separated")] = None,
        partitions: Annotated[str | None, Form(description="comma-separated")] = None,
        min_similarity: Annotated[float | None, Form(ge=-1, le=1)] = None,
        max_similarity: Annotated[float | None, Form(ge=-1, le=1)] = None,
        scores: Annotated[str | None, Form(description="comma-separated NAME>=VALUE")] = None,
        unique: Annotated[str | None, Form(description="a SemDeDup grouping")] = None,
    ) -> dict[str, Any]:
        """Top-k rows for an uploaded image, preprocessed by the table's recorded mode."""
        try:
            filters = SearchIn(
                k=k,
                statuses=_split(statuses),
                partitions=_split(partitions),
                min_similarity=min_similarity,
                max_similarity=max_similarity,
                scores=_split(scores),
                unique=unique or None,
            )
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from e
        start = time.perf_counter()
        rows = _decoded(state, [await file.read()], [file.filename or "file"])
        [q] = await state.images.submit_async(rows)
        encode_ms = (time.perf_counter() - start) * 1000
        out = run_search(q, filters, None)
        query = {"image": file.filename, "width": rows[0].width, "height": rows[0].height}
        return {"query": query, "encode_ms": round(encode_ms, 3), **out}

    @app.get("/api/rows/{key:path}")
    def row(key: str, table: str | None = None) -> dict[str, Any]:
        """Everything the table says about a row, and where its image is served."""
        i = catalog.find(key, table)
        return {**catalog.row(i), **links(i)}

    @app.get("/api/image/{key:path}")
    def image(key: str, request: Request, table: str | None = None) -> Response:
        """The row's source image, byte for byte (its sha256 is the row's image_sha256)."""
        i = catalog.find(key, table)
        location = catalog.location(i)
        etag = _etag(location.image_sha256)
        if etag and request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=_cache(etag))
        data, media = state.image_service.original(location)
        return Response(data, media_type=media, headers=_cache(etag))

    @app.get("/api/thumbnail/{key:path}")
    def thumbnail(
        key: str, request: Request, table: str | None = None, size: int = 256
    ) -> Response:
        """The row's image, resized on the server (longer side ``size``: 64, 128, 256, 512)."""
        if size not in THUMBNAIL_SIZES:
            raise HTTPException(400, f"size must be one of {THUMBNAIL_SIZES}")
        i = catalog.find(key, table)
        location = catalog.location(i)
        etag = _etag(location.image_sha256, f"-{size}")
        if etag and request.headers.get("if-none-match") == etag:
            return Response(status_code=304, headers=_cache(etag))
        data = state.image_service.thumbnail(location, size)
        return Response(data, media_type="image/jpeg", headers=_cache(etag))

    @app.get("/api/duplicates")
    def duplicates(
        limit: Annotated[int, Query(ge=1, le=5000)] = 100, threshold: float | None = None
    ) -> dict[str, Any]:
        """Near-duplicate pairs ``clipbatch dedup`` wrote under the root, most similar first."""
        files = _dedup_files(settings)
        if not files:
            return {"available": [], "pairs": [], "hint": "run `clipbatch dedup ROOT`"}
        chosen = files.get(threshold) if threshold is not None else files[min(files)]
        if chosen is None:
            raise HTTPException(404, f"no pairs at threshold {threshold}; have {sorted(files)}")
        fs, path = get_fs(chosen, settings.storage)
        with fs.open(path, "rb") as f:
            pairs = pq.read_table(f).slice(0, limit).to_pylist()
        out = []
        for p in pairs:
            sides = []
            for side in ("a", "b"):
                try:
                    i = catalog.find(p[f"key_{side}"], p[f"table_{side}"])
                except RowNotFound:
                    sides.append(
                        {"key": p[f"key_{side}"], "table": p[f"table_{side}"], "missing": True}
                    )
                    continue
                sides.append(hit(i, 1.0))
            out.append({"cosine": p["cosine"], "a": sides[0], "b": sides[1]})
        return {
            "available": sorted(files),
            "threshold": min(files) if threshold is None else threshold,
            "pairs": out,
        }


def _dedup_files(settings: ServeSettings) -> dict[float, str]:
    folder = join(settings.root, "_knn", "image")
    fs, path = get_fs(folder, settings.storage)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return {}
    out = {}
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith("dedup-") and base.endswith(".parquet"):
            try:
                out[float(base[len("dedup-") : -len(".parquet")])] = join(folder, base)
            except ValueError:
                continue
    return out


def _decoded(state: ServerState, datas: list[bytes], names: list[str]) -> list[Any]:
    """Decoded images; the first that is not one is a 400 (413 for too many pixels)."""
    if not datas:
        raise HTTPException(400, "give at least one image")
    for name, data in zip(names, datas, strict=True):
        if not data:
            raise HTTPException(400, f"{name}: the file is empty")
    rows = state.model.prepare_images(datas)
    for name, row in zip(names, rows, strict=True):
        if row.raw.status != OK:
            code = 413 if row.raw.status == TOO_LARGE else 400
            raise HTTPException(code, f"{name}: {row.raw.status}: {row.raw.error}")
    return rows


def text_vectors_response(
    accept: str, results: list[tuple[np.ndarray, bool]], state: ServerState
) -> Response:
    """``POST /api/encode/text``'s answer: the vectors and which texts were truncated."""
    vectors = np.stack([v for v, _ in results])
    truncated = [bool(t) for _, t in results]
    return _vectors_response(accept, vectors, {"truncated": truncated}, state)


def _vectors_response(
    accept: str, vectors: np.ndarray, extra: dict[str, Any], state: ServerState
) -> Response:
    model = state.model.describe()
    headers = {
        "X-Clipbatch-Model": model["name"],
        "X-Clipbatch-Checkpoint": model["checkpoint_sha256"],
    }
    if NPY in accept:
        buf = io.BytesIO()
        np.save(buf, vectors.astype(np.float32))
        return Response(buf.getvalue(), media_type=NPY, headers=headers)
    if ARROW in accept:
        dim = vectors.shape[1]
        column = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.astype(np.float32).ravel()), dim
        )
        table = pa.table({"vector": column})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return Response(sink.getvalue().to_pybytes(), media_type=ARROW, headers=headers)
    body = {
        "model": model,
        "dim": int(vectors.shape[1]),
        "vectors": vectors.round(7).tolist(),
        **extra,
    }
    return JSONResponse(body, headers=headers)


def _etag(sha: bytes | None, suffix: str = "") -> str | None:
    return f'"{sha.hex()}{suffix}"' if sha else None


def _cache(etag: str | None) -> dict[str, str]:
    if not etag:
        return {"Cache-Control": "no-store"}
    # Content-addressed: the same URL always means the same bytes, or a 409.
    return {"ETag": etag, "Cache-Control": "private, max-age=86400"}


def _split(value: str | None) -> list[str] | None:
    items = [v.strip() for v in (value or "").split(",") if v.strip()]
    return items or None


# -- middleware ------------------------------------------------------------------------------


class BodyLimit:
    """413 for a body past ``limit`` bytes, declared or streamed (plain ASGI)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _reject(send, 413, f"the body is larger than {self.limit:,} bytes")
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _reject(send, 413, f"the body is larger than {self.limit:,} bytes")


class _TooLarge(Exception):
    pass


class BearerToken:
    """Every request but ``/health`` carries the token: ``Authorization: Bearer <token>``,
    or the cookie ``GET /?token=<token>`` sets for the page's own requests."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.token = token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = b""
        auth = headers.get(b"authorization", b"")
        if auth.lower().startswith(b"bearer "):
            given = auth[7:].strip()
        else:
            for part in headers.get(b"cookie", b"").split(b";"):
                name, _, value = part.strip().partition(b"=")
                if name == TOKEN_COOKIE.encode():
                    given = value
        if scope["path"] == "/":  # a link carrying the token: the page keeps it as a cookie
            query = dict(parse_qsl(scope.get("query_string", b"").decode()))
            if "token" in query:
                given = query["token"].encode()
        if not given or not hmac.compare_digest(given, self.token):
            await _reject(send, 401, "a bearer token is required", {"www-authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)


async def _reject(
    send: Any, status: int, detail: str, headers: dict[str, str] | None = None
) -> None:
    body = JSONResponse({"detail": detail}).body
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
