"""Checkpoint files and folders: the local cache, sha256s, and fetching from object storage.

Object-store checkpoints (one file) and model folders (open_clip's ``local-dir`` layout, a
transformers ``save_pretrained`` folder) are fetched once into the cache, keyed by the
URI and the versions of the objects, so a changed object is fetched again and an
unchanged one never is. sha256s are remembered per (path, size, mtime), in memory and on
disk, so a multi-gigabyte checkpoint is read once per machine, not once per process.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Iterable
from pathlib import Path

from clipbatch.config import StorageOptions
from clipbatch.errors import ConfigError
from clipbatch.io.retry import with_retries
from clipbatch.io.storage import file_digests, get_fs, object_version, protocol_of

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npz", ".msgpack", ".h5")
# Files that define architecture, preprocessing and tokenizer in a model folder.
CONFIG_SUFFIXES = (".json", ".txt", ".model", ".spm", ".vocab", ".tiktoken")


def cache_dir() -> Path:
    root = os.environ.get("CLIPBATCH_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "clipbatch"
    )
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def file_sha256(path: str | Path) -> str:
    return file_digests(path)[0]


def cached_sha256(path: str | Path) -> str:
    """sha256 of a file, remembered per (real path, size, mtime) in memory and on disk."""
    real = os.path.realpath(path)
    st = os.stat(real)
    return _sha256_of(real, st.st_size, st.st_mtime)


@functools.lru_cache(maxsize=1024)
def _sha256_of(real: str, size: int, mtime: float) -> str:
    memo = cache_dir() / "sha256" / (hashlib.sha256(real.encode()).hexdigest()[:32] + ".json")
    try:
        saved = json.loads(memo.read_text())
        same = (saved["size"], saved["mtime"]) == (size, mtime)
        sha = str(saved["sha256"]) if same else ""
    except (OSError, ValueError, KeyError):
        sha = ""
    if not sha:
        sha = file_sha256(real)
        if size > 64 << 20:  # worth remembering across processes
            _write_atomic(memo, json.dumps({"size": size, "mtime": mtime, "sha256": sha}))
    return sha


def combined_sha256(root: Path, files: Iterable[Path]) -> str:
    """One file's sha256, or for several (sharded weights) the sha256 of their name/sha list."""
    files = sorted(files)
    if len(files) == 1:
        return cached_sha256(files[0])
    lines = "".join(f"{p.relative_to(root).as_posix()} {cached_sha256(p)}\n" for p in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def config_files(root: Path) -> list[Path]:
    """The files of a model folder that define architecture, preprocessing and tokenizer."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or rel.startswith(".") or "/." in rel:
            continue
        if p.suffix in CONFIG_SUFFIXES and not p.name.lower().startswith("readme"):
            out.append(p)
    return out


def config_sha256(root: Path) -> str:
    """The sha256 of a folder's config files: names and contents (weights excluded)."""
    h = hashlib.sha256()
    for p in config_files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def fetch_remote_checkpoint(uri: str, storage: StorageOptions) -> Path:
    """Download an object-store checkpoint once into the local cache, keyed by its version."""
    fs, path = get_fs(uri, storage)
    try:
        version = object_version(fs, path)
    except FileNotFoundError as e:
        raise ConfigError(f"checkpoint {uri!r} does not exist") from e
    digest = hashlib.sha256(f"{uri}|{version}".encode()).hexdigest()[:24]
    target = cache_dir() / "checkpoints" / f"{digest}-{Path(path).name}"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.part")
    with_retries(lambda: fs.get_file(path, str(tmp)), f"download {uri}")
    os.replace(tmp, target)
    log.info("fetched checkpoint %s (%s) into %s", uri, protocol_of(uri), target)
    return target


def fetch_remote_folder(uri: str, storage: StorageOptions) -> Path:
    """Download a model folder from object storage once into the cache.

    Keyed by the URI and every object's version: a changed file fetches the folder again.
    """
    fs, root = get_fs(uri, storage)
    root = root.rstrip("/")
    try:
        listing = with_retries(lambda: fs.find(root, detail=True), f"list {uri}")
    except FileNotFoundError:
        listing = {}
    objects = []
    for path, info in sorted(listing.items()):
        if info.get("type") == "directory":
            continue
        rel = path[len(root) :].lstrip("/")
        if not rel or rel.startswith("/") or ".." in Path(rel).parts:
            continue
        objects.append((rel, path, object_version(fs, path, info)))
    if not objects:
        raise ConfigError(f"model folder {uri!r} does not exist or is empty")
    key = json.dumps([uri, [(rel, version) for rel, _, version in objects]])
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    target = cache_dir() / "folders" / digest
    if (target / ".clipbatch-complete").is_file():
        return target
    tmp = target.with_name(f"{digest}.{os.getpid()}.{threading.get_ident()}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel, path, _ in objects:
        dest = tmp / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        with_retries(lambda p=path, d=dest: fs.get_file(p, str(d)), f"download {uri}/{rel}")
    (tmp / ".clipbatch-complete").write_text(key)
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same folder first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / ".clipbatch-complete").is_file():
            raise
    log.info("fetched model folder %s (%d files) into %s", uri, len(objects), target)
    return target


def local_folder(location: str, storage: StorageOptions, what: str) -> Path:
    """A model folder on local disk: the path itself, or the cached copy of a remote one."""
    from clipbatch.io.storage import is_local

    if is_local(location):
        path = Path(location[len("file://") :] if location.startswith("file://") else location)
        if not path.is_dir():
            raise ConfigError(f"{what}: {location!r} is not a folder")
        return path.resolve()
    return fetch_remote_folder(location, storage)


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache costs a re-hash, nothing else
        log.debug("could not remember a sha256 in %s: %s", path, e)
