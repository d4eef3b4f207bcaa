"""Caption decoding: bytes to NFC text, with stable statuses for what goes wrong."""

from __future__ import annotations

import unicodedata

from clipbatch.records import CAPTION_DECODE_ERROR, EMPTY_CAPTION


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
    from clipbatch.records import MISSING_CAPTION

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
