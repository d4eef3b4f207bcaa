"""Names that changed, still accepted in their old form.

- ``CLIPBATCH_CRASH_AT=before_manifest``: the crash point before the commit record was
  called that while the index was ``_manifest.json`` (up to af75f36); drills and scripts
  written then still work. May go after 0.3.
"""

from __future__ import annotations

CRASH_POINT_ALIASES = {"before_manifest": "before_index"}


def crash_point_name(name: str) -> str:
    """The current name of a crash point named ``name`` (old names map to new ones)."""
    return CRASH_POINT_ALIASES.get(name, name)
