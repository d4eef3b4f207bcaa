"""Deterministic listing of dataset objects: prefixes, globs and brace patterns.

Brace patterns (``{00000..00099}.tar``, ``{a,b}``) are expanded here rather than by a
shell, so users need no quoting tricks (clip-retrieval#245).
"""

from __future__ import annotations

import itertools
import re

import fsspec

from clipbatch.errors import ConfigError, SourceError
from clipbatch.storage import with_retries

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = set("*?[")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` and zero-padded ``{000..123}`` ranges, in order."""
    match = _BRACE.search(pattern)
    if not match:
        return [pattern]
    body = match.group(1)
    rng = _RANGE.match(body)
    if rng:
        lo_s, hi_s = rng.groups()
        lo, hi = int(lo_s), int(hi_s)
        width = len(lo_s) if lo_s.startswith("0") and len(lo_s) > 1 else 0
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:
        raise ConfigError(f"cannot expand brace pattern {{{body}}} in {pattern!r}")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return list(itertools.chain.from_iterable(expand_braces(head + o + tail) for o in options))


def has_pattern(path: str) -> bool:
    return bool(_BRACE.search(path)) or any(c in path for c in _GLOB_CHARS)


def list_files(
    fs: fsspec.AbstractFileSystem, path: str, suffixes: tuple[str, ...], recursive: bool
) -> list[tuple[str, dict]]:
    """(path, info) for files under ``path`` (a file, prefix, glob or brace pattern), sorted.

    Names starting with '_' or '.' are bookkeeping (ours or img2dataset's) and skipped.
    """
    suffixes = tuple(s.lower() for s in suffixes)

    def wanted(p: str) -> bool:
        name = p.rsplit("/", 1)[-1]
        return not name.startswith(("_", ".")) and (not suffixes or name.lower().endswith(suffixes))

    found: dict[str, dict] = {}
    for pattern in expand_braces(path):
        if any(c in pattern for c in _GLOB_CHARS):
            entries = with_retries(lambda p=pattern: fs.glob(p, detail=True), f"glob {pattern}")
            for p, info in entries.items():
                if info.get("type") == "file" and wanted(p):
                    found[p] = info
            continue
        try:
            info = with_retries(lambda p=pattern: fs.info(p), f"stat {pattern}")
        except FileNotFoundError:
            if len(expand_braces(path)) > 1:
                raise SourceError(f"{pattern} (from brace pattern {path}) does not exist") from None
            raise ConfigError(f"source {path!r} does not exist") from None
        if info.get("type") == "directory":
            if recursive:
                entries = with_retries(lambda p=pattern: fs.find(p, detail=True), f"list {pattern}")
            else:
                entries = {
                    e["name"]: e
                    for e in with_retries(
                        lambda p=pattern: fs.ls(p, detail=True), f"list {pattern}"
                    )
                }
            for p, e in entries.items():
                # Skip bookkeeping folders such as _tmp/ and _lineage/ anywhere below.
                rel = p[len(pattern.rstrip("/")) :]
                if any(part.startswith(("_", ".")) for part in rel.split("/")[:-1] if part):
                    continue
                if e.get("type", "file") == "file" and wanted(p):
                    found[p] = e
        elif wanted(pattern) or pattern == path:
            found[pattern] = info
    return sorted(found.items())
