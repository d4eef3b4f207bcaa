"""``POST /api/encode/text``'s hot path: well-formed requests answered in plain ASGI.

Under load the encoders' cost is mostly per request, not per text: with 32 clients the
forward passes are shared, and what remains is the event loop's work for each request.
FastAPI's part of it (routing, dependency solving, body validation, its exception
middleware) is about half, on the one core the loop holds. This middleware answers a
well-formed request (a JSON object ``{"texts": [...]}``, at most ``max_texts`` texts, none
blank) straight from the batcher, with the response the route makes (``respond``:
:func:`clipbatch.serve.app.text_vectors_response`). Anything else, or any error on the
way, goes on to the route with the body replayed, so that every bad request gets the
route's own 4xx and message. The route stays the API's description (OpenAPI).

It sits inside the token check and the body limit (``create_app`` adds it innermost).

Example::

    respond = functools.partial(text_vectors_response, state=state)
    app.user_middleware.append(
        Middleware(EncodeTextFastPath, state=state, max_texts=1024, respond=respond)
    )
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

PATH = "/api/encode/text"


class EncodeTextFastPath:
    """Plain ASGI middleware; see the module."""

    def __init__(
        self, app: Any, state: Any, max_texts: int, respond: Callable[[str, list], Any]
    ) -> None:
        self.app = app
        self.state = state
        self.max_texts = max_texts
        self.respond = respond  # (accept, results) -> the route's response

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        accept, content_type = "", b""
        for name, value in scope.get("headers") or ():
            if name == b"accept":
                accept = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: the route's business
                await self.app(scope, _replay(b"".join(chunks), message, receive), send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        texts = _well_formed(body, content_type, self.max_texts)
        if texts is None:
            await self.app(scope, _replay(body, None, receive), send)
            return
        try:
            results = await self.state.texts.submit_async(texts)
            response = self.respond(accept, results)
        except Exception:  # noqa: BLE001 - the route answers it, as it always has
            log.debug("the fast path passed a request on to the route", exc_info=True)
            await self.app(scope, _replay(body, None, receive), send)
            return
        await response(scope, receive, send)


def _well_formed(body: bytes, content_type: bytes, max_texts: int) -> list[str] | None:
    """The texts of a request the route would accept as it is, else None."""
    if content_type.split(b";", 1)[0].strip().lower() != b"application/json":
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.keys() != {"texts"}:
        return None
    texts = data["texts"]
    if not isinstance(texts, list) or not 0 < len(texts) <= max_texts:
        return None
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            return None
    return texts


def _replay(body: bytes, last: dict | None, receive: Any) -> Any:
    """A ``receive`` that gives the body read already, then (``last``) what ended it,
    then the connection's own messages."""
    pending: list[dict] = [{"type": "http.request", "body": body, "more_body": False}]
    if last is not None:
        pending = [last] if not body else [pending[0], last]

    async def replayed() -> dict:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
