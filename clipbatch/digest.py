"""The canonical digest of a JSON payload: what every fingerprint formula hashes with.

Never change it: every fingerprint a table carries is this digest, so a change would
re-encode every user's table (tests/test_golden.py pins fingerprints).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def json_value(value: Any) -> Any:
    """A config value as JSON sees it (tuples are lists)."""
    return list(value) if isinstance(value, tuple) else value


def digest(payload: dict[str, Any]) -> str:
    """sha256 hex of ``payload`` as compact, key-sorted JSON."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
