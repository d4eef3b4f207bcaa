"""Which shards a run must encode, and which it can skip (design.md §4).

Skipping is decided once, in the flow, from one listing of ``dest`` plus the
manifest, so a resumed run over 100k shards spends no task runs on done work. A
shard whose file exists but is missing from the manifest (a crash between the move
and the manifest update) is adopted from its own footer when the fingerprint matches.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from clipbatch.config import EmbedConfig
from clipbatch.errors import SourceError
from clipbatch.fingerprint import shard_fingerprint
from clipbatch.manifest import read_manifest, update_manifest
from clipbatch.model import ResolvedCheckpoint, resolve_checkpoint
from clipbatch.records import ShardResult, ShardSpec
from clipbatch.sink import output_uri, read_file_metadata
from clipbatch.sources import get_reader
from clipbatch.storage import get_fs, object_version, to_uri, with_retries

log = logging.getLogger(__name__)


@dataclass
class RunPlan:
    checkpoint: ResolvedCheckpoint
    shards: list[ShardSpec]
    fingerprints: dict[str, str]
    todo: list[ShardSpec] = field(default_factory=list)
    skipped: list[ShardResult] = field(default_factory=list)


def existing_outputs(config: EmbedConfig) -> set[str]:
    """Names of committed shard files under dest (one listing, not a HEAD per shard)."""
    fs, path = get_fs(config.sink.url, config.sink.storage)
    try:
        entries = with_retries(lambda: fs.ls(path, detail=False), f"list {path}")
    except FileNotFoundError:
        return set()
    names = set()
    for entry in entries:
        base = entry.rstrip("/").rsplit("/", 1)[-1]
        if base.endswith(".parquet") and not base.startswith(("_", ".")):
            names.add(base[: -len(".parquet")])
    return names


def sidecar_versions(config: EmbedConfig, shards: list[ShardSpec]) -> dict[str, str]:
    """Shard name -> version of its sidecar ``.parquet``, from one listing per folder."""
    wanted = {s.sidecar_uri: s.name for s in shards if s.sidecar_uri}
    if not wanted:
        return {}
    fs, _ = get_fs(config.source.url, config.source.storage)
    folders = sorted({uri.rsplit("/", 1)[0] for uri in wanted})
    out: dict[str, str] = {}
    for folder in folders:
        _, path = get_fs(folder, config.source.storage)
        infos = with_retries(lambda p=path: fs.ls(p, detail=True), f"list {folder}")
        for info in infos:
            uri = to_uri(fs, info["name"])
            if uri in wanted:
                out[wanted[uri]] = object_version(fs, info["name"], info)
    missing = [name for uri, name in wanted.items() if name not in out]
    if missing:
        # Listed as present a moment ago: a vanishing sidecar is a changing source.
        raise SourceError(f"sidecar parquet of shard(s) {missing[:5]} disappeared while planning")
    return out


def plan_shards(config: EmbedConfig, shards: list[ShardSpec] | None = None) -> RunPlan:
    checkpoint = resolve_checkpoint(config.model)
    shards = shards if shards is not None else get_reader(config.source).list_shards()
    sidecars = sidecar_versions(config, shards)
    fingerprints = {
        s.name: shard_fingerprint(s, config, checkpoint.sha256, sidecars.get(s.name))
        for s in shards
    }
    plan = RunPlan(checkpoint=checkpoint, shards=shards, fingerprints=fingerprints)
    if config.sink.overwrite:
        plan.todo = list(shards)
        return plan
    existing = existing_outputs(config)
    manifest = read_manifest(config.sink).get("shards", {})
    adopted: dict[str, dict] = {}
    for shard in shards:
        fp = fingerprints[shard.name]
        entry = manifest.get(shard.name)
        if shard.name in existing and entry and entry.get("fingerprint") == fp:
            plan.skipped.append(_skipped(shard, entry, config))
            continue
        if shard.name in existing and not (entry and entry.get("fingerprint") == fp):
            meta = read_file_metadata(output_uri(config.sink.url, shard.name), config.sink.storage)
            if meta and meta.get("fingerprint") == fp:
                record = manifest_record_from_metadata(meta)
                adopted[shard.name] = record
                plan.skipped.append(_skipped(shard, record, config))
                continue
        plan.todo.append(shard)
    if adopted:
        log.info("adopting %d committed shard(s) missing from the manifest", len(adopted))
        update_manifest(config.sink, adopted)
    return plan


def manifest_record(result: ShardResult, run_id: str) -> dict:
    return {
        "fingerprint": result.fingerprint,
        "rows": result.rows,
        "counts": result.counts,
        "sha256": result.sha256,
        "source_uri": result.source_uri,
        "source_version": result.source_version,
        "run_id": run_id,
        "file": result.output_uri.rsplit("/", 1)[-1],
    }


def manifest_record_from_metadata(meta: dict) -> dict:
    return {
        "fingerprint": meta.get("fingerprint"),
        "rows": meta.get("rows"),
        "counts": meta.get("counts", {}),
        "sha256": None,
        "source_uri": meta.get("source", {}).get("uri"),
        "source_version": meta.get("source", {}).get("version"),
        "run_id": meta.get("run", {}).get("run_id"),
    }


def _skipped(shard: ShardSpec, entry: dict, config: EmbedConfig) -> ShardResult:
    return ShardResult(
        shard=shard.name,
        output_uri=output_uri(config.sink.url, shard.name),
        status="skipped",
        rows=int(entry.get("rows") or 0),
        counts=dict(entry.get("counts") or {}),
        fingerprint=entry.get("fingerprint") or "",
        source_uri=shard.uri,
        source_version=shard.version,
        sha256=entry.get("sha256"),
    )
