"""Deterministic listing of dataset objects: prefixes, globs and brace patterns.

A source is listed **once**, by the plan, with a bounded number of requests per object:
listing pages (one per 1,000 keys on S3), never a request per shard.

- A prefix (or folder) is listed recursively, in one paged listing.
- A brace pattern (``{00000..00099}.tar``, ``{a,b}``) is expanded here rather than by a
  shell, so users need no quoting tricks (clip-retrieval#245). The expanded names are
  looked up in one listing of each parent folder (or, when they spread over many
  folders, one recursive listing of their common prefix), not with a HEAD per name.
- A glob is matched against one recursive listing of its static prefix.

The listing keeps every file under the folders it listed, matched or not, so readers can
find siblings (img2dataset's ``NNNNN.parquet`` beside ``NNNNN.tar``) without asking the
store again. Infos are reduced to :class:`ObjectInfo` right away: the plan holds a few
hundred bytes per object, not the store's full answer.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import fsspec
from braceexpand import UnbalancedBracesError, braceexpand
from fsspec.utils import glob_translate

from clipbatch.config import SourceConfig
from clipbatch.errors import ConfigError, SourceError
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import get_fs, object_version

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB_CHARS = set("*?[")
# Expanded brace names spread over more folders than this are looked up in one recursive
# listing of their common prefix instead of one listing per folder.
MAX_FOLDER_LISTINGS = 8


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` and zero-padded ``{000..123}`` ranges, in order (braceexpand).

    A brace group that is neither a list nor a range, or unbalanced braces, is a
    :class:`ConfigError`: a literal ``{`` in a dataset URL is far more likely a typo.
    """
    for match in _BRACE.finditer(pattern):
        body = match.group(1)
        if not _RANGE.match(body) and "," not in body:
            raise ConfigError(f"cannot expand brace pattern {{{body}}} in {pattern!r}")
    try:
        return list(braceexpand(pattern))
    except UnbalancedBracesError as e:
        raise ConfigError(f"cannot expand brace pattern in {pattern!r}: {e}") from None


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What the plan keeps of one listed object."""

    path: str  # the path on the listing's filesystem (no scheme)
    version: str  # ETag / version id / size+mtime (clipbatch.io.storage.object_version)
    size: int | None = None


@dataclass
class Listing:
    """The objects a source URL names, plus every file under the folders listed for it."""

    url: str
    fs: fsspec.AbstractFileSystem
    matches: list[ObjectInfo]  # what the URL names, sorted by path, bookkeeping excluded
    files: dict[str, ObjectInfo] = field(default_factory=dict)  # everything listed, by path
    complete: set[str] = field(default_factory=set)  # folders whose every file is in ``files``
    requests: int = 0  # listing calls made (each may be several pages)

    def sibling(self, path: str) -> ObjectInfo | None:
        """The info of ``path`` from the listing, or from one HEAD if its folder was not listed."""
        info = self.files.get(path)
        if info is not None or posixpath.dirname(path) in self.complete:
            return info
        try:
            raw = with_retries(lambda: self.fs.info(path), f"stat {path}")
        except FileNotFoundError:
            return None
        # Versions as a listing reports them (a HEAD adds VersionId on versioned buckets,
        # a listing does not), so a shard's fingerprint does not depend on how it was found.
        raw = {k: v for k, v in raw.items() if k not in ("VersionId", "version_id")}
        info = _object_info(self.fs, path, raw)
        self.files[path] = info
        return info


def is_bookkeeping(rel: str) -> bool:
    """Names starting with '_' or '.' anywhere in ``rel`` are ours or img2dataset's."""
    return any(part.startswith(("_", ".")) for part in rel.split("/") if part)


def _object_info(fs: fsspec.AbstractFileSystem, path: str, info: dict) -> ObjectInfo:
    size = info.get("size", info.get("Size"))
    return ObjectInfo(path=path, version=object_version(fs, path, info), size=size)


def find_files(
    fs: fsspec.AbstractFileSystem, root: str
) -> dict[str, dict] | Iterable[tuple[str, ObjectInfo]]:
    """Every file under ``root``, recursively: (path, info) pairs.

    On S3 the pages are consumed one at a time (s3fs's page iterator), so a listing of
    230,000 keys never holds 230,000 full info dicts at once; elsewhere ``fs.find``.
    """
    pages = _s3_pages(fs, root)
    if pages is not None:
        return with_retries(lambda: list(pages()), f"list {root}")
    found = with_retries(lambda: fs.find(root, detail=True), f"list {root}")
    return found if isinstance(found, dict) else {p: fs.info(p) for p in found}


def _s3_pages(fs: fsspec.AbstractFileSystem, root: str):
    """A function listing ``root`` on S3 page by page into compact pairs, or None."""
    iterdir = getattr(fs, "_iterdir", None)
    if iterdir is None or "s3" not in (
        fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    ):
        return None
    from fsspec.asyn import sync

    bucket, key, _ = fs.split_path(root)
    prefix = f"{key.rstrip('/')}/" if key else ""

    def pages() -> list[tuple[str, ObjectInfo]]:
        async def collect() -> list[tuple[str, ObjectInfo]]:
            out = []
            async for info in iterdir(bucket, delimiter="", prefix=prefix):
                name = info["name"]
                if info.get("type") == "file" and not name.endswith("/"):
                    # Reduced at once: the store's full answer is not kept.
                    out.append((name, _object_info(fs, name, info)))
            return out

        return sync(fs.loop, collect)

    return pages


def _ls(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, dict]:
    try:
        entries = with_retries(lambda: fs.ls(folder, detail=True), f"list {folder}")
    except FileNotFoundError:
        return {}
    return {e["name"].rstrip("/"): e for e in entries}


def list_source(fs: fsspec.AbstractFileSystem, url_path: str, url: str | None = None) -> Listing:
    """List what ``url_path`` (a file, prefix, glob or brace pattern on ``fs``) names.

    Names starting with '_' or '.' below the listed root are bookkeeping and never match.
    """
    listing = Listing(url=url or url_path, fs=fs, matches=[])
    patterns = expand_braces(url_path)
    matched: dict[str, ObjectInfo] = {}
    plain: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in _GLOB_CHARS):
            _match_glob(listing, pattern, matched)
        else:
            plain.append(pattern)
    if len(patterns) > 1:
        _match_expanded(listing, plain, url_path, matched)
    elif plain:
        _match_path(listing, plain[0], matched)
    listing.matches = [matched[p] for p in sorted(matched)]
    return listing


def _add_tree(
    listing: Listing,
    root: str,
    entries: dict[str, dict] | Iterable[tuple[str, ObjectInfo]],
    complete: bool,
) -> None:
    """Record every file of a (recursive) listing under ``root``."""
    root = root.rstrip("/")
    for p, e in entries.items() if isinstance(entries, dict) else entries:
        if isinstance(e, ObjectInfo):
            listing.files[p] = e
        elif e.get("type", "file") != "file":
            continue
        else:
            p = p.rstrip("/")
            listing.files[p] = _object_info(listing.fs, p, e)
        if complete:
            listing.complete.add(posixpath.dirname(p))
    if complete:
        listing.complete.add(root)


def _under(root: str, path: str) -> str:
    root = root.rstrip("/")
    return path[len(root) :].lstrip("/") if path.startswith(root) else path


def _match_glob(listing: Listing, pattern: str, matched: dict[str, ObjectInfo]) -> None:
    static = pattern[: min(pattern.index(c) for c in _GLOB_CHARS if c in pattern)]
    root = static.rsplit("/", 1)[0] if "/" in static else ""
    entries = find_files(listing.fs, root) if root else {}
    listing.requests += 1
    _add_tree(listing, root, entries, complete=True)
    regex = re.compile(glob_translate(pattern.rstrip("/")))
    for p, info in listing.files.items():
        if regex.match(p) and not is_bookkeeping(_under(root, p)):
            matched[p] = info


def _match_path(listing: Listing, path: str, matched: dict[str, ObjectInfo]) -> None:
    """A single file or a folder (listed recursively)."""
    fs = listing.fs
    try:
        info = with_retries(lambda: fs.info(path), f"stat {path}")
    except FileNotFoundError:
        raise ConfigError(f"source {listing.url!r} does not exist") from None
    listing.requests += 1
    if info.get("type") == "directory":
        entries = find_files(fs, path)
        listing.requests += 1
        _add_tree(listing, path, entries, complete=True)
        for p, obj in listing.files.items():
            if p.startswith(path.rstrip("/") + "/") and not is_bookkeeping(_under(path, p)):
                matched[p] = obj
        return
    obj = _object_info(fs, path.rstrip("/"), info)
    listing.files[obj.path] = obj
    matched[obj.path] = obj


def _match_expanded(
    listing: Listing, names: list[str], pattern: str, matched: dict[str, ObjectInfo]
) -> None:
    """Brace-expanded names: look each up in one listing per parent folder (or one
    recursive listing of their common prefix), never with a request per name.

    A name that is a folder matches every file below it (listed recursively).
    """
    if not names:
        return
    fs = listing.fs
    names = [n.rstrip("/") for n in names]
    parents = sorted({posixpath.dirname(n) for n in names})
    wanted = set(names)
    folder_names: set[str] = set()
    if len(parents) <= MAX_FOLDER_LISTINGS:
        for parent in parents:
            entries = _ls(fs, parent)
            listing.requests += 1
            _add_tree(listing, parent, entries, complete=True)
            dirs = {p for p, e in entries.items() if e.get("type") == "directory"}
            if dirs & wanted:  # named folders: one recursive listing of this parent
                _match_folders(listing, parent, wanted, matched, folder_names)
    else:
        root = posixpath.commonpath(parents) if all(parents) else ""
        _match_folders(listing, root, wanted, matched, folder_names)
    missing = []
    for name in names:
        if name in listing.files:
            matched.setdefault(name, listing.files[name])
        elif name not in folder_names:
            missing.append(name)
    if missing:
        raise SourceError(
            f"{missing[0]} (from brace pattern {pattern}) does not exist"
            + (f", nor do {len(missing) - 1} more" if len(missing) > 1 else "")
        )


def _match_folders(
    listing: Listing,
    root: str,
    wanted: set[str],
    matched: dict[str, ObjectInfo],
    folder_names: set[str],
) -> None:
    """One recursive listing of ``root``; files below a folder named in ``wanted`` match."""
    entries = find_files(listing.fs, root)
    listing.requests += 1
    _add_tree(listing, root, entries, complete=True)
    for p, obj in listing.files.items():
        folder = posixpath.dirname(p)
        while folder and folder != root:
            if folder in wanted:
                folder_names.add(folder)
                if not is_bookkeeping(_under(folder, p)):
                    matched[p] = obj
                break
            parent = posixpath.dirname(folder)
            if parent == folder:
                break
            folder = parent


def filter_suffixes(infos: Iterable[ObjectInfo], suffixes: tuple[str, ...]) -> list[ObjectInfo]:
    """The infos whose names end with one of ``suffixes`` (case-insensitive); all if empty."""
    suffixes = tuple(s.lower() for s in suffixes)
    if not suffixes:
        return list(infos)
    return [i for i in infos if i.path.rsplit("/", 1)[-1].lower().endswith(suffixes)]


def list_source_url(source: SourceConfig) -> Listing:
    """One listing of everything ``source.url`` names (see :mod:`clipbatch.sources.listing`)."""
    fs, path = get_fs(source.url, source.storage)
    return list_source(fs, path, source.url)
