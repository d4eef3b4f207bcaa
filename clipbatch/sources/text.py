"""Captions and JSON sidecars, the same way for every reader: tar members, folder files,
table cells. Bytes become NFC text, with stable statuses for what goes wrong."""

from __future__ import annotations

import json
import unicodedata
from typing import Any

from clipbatch.records import CAPTION_DECODE_ERROR, EMPTY_CAPTION, MISSING_CAPTION, RawSample


def decode_caption(data: bytes) -> tuple[str | None, tuple[str, str] | None]:
    """(caption, problem). ``problem`` is (status, error) or None.

    A non-UTF-8 caption is a row status, not a guess at an encoding: silently
    mis-decoded text would give a wrong embedding that nobody notices.
    """
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        return None, (
            CAPTION_DECODE_ERROR,
            f"caption is not valid UTF-8 ({e.reason} at byte {e.start})",
        )
    text = unicodedata.normalize("NFC", text).strip()
    if not text:
        return None, (EMPTY_CAPTION, "caption is empty")
    return text, None


def caption_from_value(value: object) -> tuple[str | None, tuple[str, str] | None]:
    """A caption from a table cell or a JSON field: str, bytes, a number, or None.

    ``None`` means the row has no caption (status ``missing_caption``). Text that was
    read with ``surrogateescape`` (a non-UTF-8 CSV/JSONL byte) is a decode error too.
    """
    if value is None:
        return None, (MISSING_CAPTION, "caption is null")
    if isinstance(value, bytes | bytearray | memoryview):
        return decode_caption(bytes(value))
    text = value if isinstance(value, str) else str(value)
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as e:
        return None, (
            CAPTION_DECODE_ERROR,
            f"caption is not valid UTF-8 (undecodable byte at character {e.start})",
        )
    return decode_caption(data)


def parse_json(data: bytes) -> tuple[Any, str]:
    """A ``.json`` member: (the parsed object or None, the text for the ``json`` column).

    Valid JSON is kept canonical (sorted keys); invalid JSON is kept as text, so a broken
    sidecar is visible in the table rather than dropped.
    """
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None, data.decode("utf-8", "replace")
    return meta, json.dumps(meta, sort_keys=True, ensure_ascii=False)


def set_caption(
    sample: RawSample,
    json_field: str | None,
    meta: Any,
    caption_ext: str | None,
    data: bytes | None,
    missing: str | None,
    json_where: str,
) -> None:
    """Give ``sample`` its caption, or the status saying why it has none.

    The caption comes from ``json_field`` of the row's JSON (``meta``) when one is set, else
    from the caption file or member: ``data``, or ``missing``, the reason there is none.
    ``caption_ext`` None is an image-only dataset: no caption is expected.
    """
    if json_field:
        value = meta.get(json_field) if isinstance(meta, dict) else None
        if value is None:
            sample.status, sample.error = (
                MISSING_CAPTION,
                f"no {json_field!r} field in {json_where}",
            )
            return
        sample.caption, problem = caption_from_value(value)
    elif caption_ext is None:
        return
    elif data is None:
        sample.status, sample.error = MISSING_CAPTION, missing or f"no .{caption_ext} caption"
        return
    else:
        sample.caption, problem = decode_caption(data)
    if problem:
        sample.status, sample.error = problem
