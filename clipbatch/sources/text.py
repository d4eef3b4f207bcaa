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
