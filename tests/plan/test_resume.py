"""Issue 5: fingerprint resume, adoption after a crash, and stale-staging cleanup (§2, §4).

Local files keep these fast; tests/pipeline/test_faults.py runs the same protocol on S3 under faults.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import clip.model
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clipbatch.config import EmbedConfig, build_config
from clipbatch.models.openai import TINY_ARCH
from clipbatch.plan.planner import plan_shards
from clipbatch.sink.commits.index import all_records
from clipbatch.sink.commits.segments import commits_uri
from clipbatch.sink.layout import LOCAL_PREFIX, TMP_DIR, staging_id
from clipbatch.sink.staging import STALE_AFTER_SECONDS, clean_local_temp, clean_staging
from clipbatch.synthetic import write_webdataset

pytestmark = pytest.mark.timeout(180)

SHARDS = 3


def config(src: Path, dest: Path, **overrides) -> EmbedConfig:
    raw = {
        "source": str(src),
        "dest": str(dest),
        "model": "tiny",
        "runtime": {"device": "cpu", "batch_size": 4, "decode_workers": 1, "task_retries": 0},
    }
    return build_config(raw, overrides)


@pytest.fixture(scope="module")
def done(prefect_harness, tmp_path_factory) -> tuple[Path, Path]:
    """A source with a sidecar on shard 00000, embedded once by the flow."""
    from clipbatch_flows.embed import embed_dataset

    root = tmp_path_factory.mktemp("resume")
    src, dest = root / "src", root / "out"
    write_webdataset(src, shards=SHARDS, per_shard=3, seed=3, size=40)
    write_sidecar(src / "00000.parquet", "v1")
    summary = embed_dataset(config(src, dest))
    assert summary["shards_committed"] == SHARDS
    return src, dest


def write_sidecar(path: Path, tag: str) -> None:
    keys = [f"{i:09d}" for i in range(3)]
    pq.write_table(
        pa.table({"key": keys, "url": [f"https://example.invalid/{tag}/{k}" for k in keys]}), path
    )


def todo(cfg: EmbedConfig) -> list[str]:
    return [s.name for s in plan_shards(cfg).todo]


def test_a_finished_local_run_leaves_no_empty_bookkeeping(done):
    _, dest = done
    assert not (dest / TMP_DIR).exists()
    assert sorted(p.name for p in dest.iterdir() if p.name.startswith("_")) == [
        "_commits",
        "_lineage",
        "_members",
    ]


def test_rerun_skips_every_shard_and_reports_it(prefect_harness, done):
    from clipbatch_flows.embed import embed_dataset

    src, dest = done
    mtimes = {p.name: p.stat().st_mtime_ns for p in dest.glob("*.parquet")}
    summary = embed_dataset(config(src, dest))
    assert summary["shards_skipped"] == SHARDS and summary["shards_committed"] == 0
    assert {r["status"] for r in summary["results"]} == {"skipped"}
    assert summary["status_counts"] == {"ok": SHARDS * 3}  # skipped shards still counted
    assert {p.name: p.stat().st_mtime_ns for p in dest.glob("*.parquet")} == mtimes


@pytest.mark.parametrize(
    "change",
    [
        {"sink.dtype": "float32"},
        {"sink.normalize": False},
        {"runtime.preprocess": "fast"},
        {"model.max_caption_tokens": 16},
        {"source.caption_json_field": "caption"},
        {"sink.overwrite": True},
    ],
    ids=lambda c: next(iter(c)),
)
def test_changed_output_options_or_overwrite_redo_every_shard(done, change):
    src, dest = done
    assert todo(config(src, dest)) == []
    assert todo(config(src, dest, **change)) == [f"{i:05d}" for i in range(SHARDS)]


def test_changed_model_checkpoint_redoes_every_shard(done, tmp_path):
    src, dest = done
    torch.manual_seed(1)
    ckpt = tmp_path / "other-tiny.pt"
    torch.save(clip.model.CLIP(**TINY_ARCH).state_dict(), ckpt)
    assert todo(config(src, dest, **{"model.name": str(ckpt)})) == ["00000", "00001", "00002"]


def test_new_source_object_version_redoes_that_shard_only(done):
    src, dest = done
    tar = src / "00001.tar"  # locally the version is size+mtime (an ETag on S3)
    before = tar.stat()
    try:
        os.utime(tar, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
        assert todo(config(src, dest)) == ["00001"]
    finally:
        os.utime(tar, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert todo(config(src, dest)) == []


def test_new_sidecar_version_redoes_that_shard_only(done):
    src, dest = done
    sidecar = src / "00000.parquet"
    original = sidecar.read_bytes()
    stat = sidecar.stat()
    try:
        write_sidecar(sidecar, "v2")  # img2dataset re-crawled: new urls, same tar
        assert todo(config(src, dest)) == ["00000"]
    finally:
        sidecar.write_bytes(original)
        os.utime(sidecar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert todo(config(src, dest)) == []


def test_committed_file_missing_from_the_index_is_adopted_from_its_footer(done, tmp_path):
    """A crash between the move and the index write: the next plan adopts the file."""
    import shutil

    src, dest = done
    index = Path(commits_uri(str(dest)))
    saved = tmp_path / "saved-index"
    shutil.copytree(index, saved)
    try:
        shutil.rmtree(index)
        cfg = config(src, dest)
        plan = plan_shards(cfg)
        assert plan.todo == [] and len(plan.skipped) == SHARDS
        assert plan.stats.footer_reads == SHARDS  # one read per file the index missed
        assert sorted(r.shard for r in all_records(cfg.sink)) == ["00000", "00001", "00002"]
        again = plan_shards(cfg)  # adopted once, then planned from the index alone
        assert again.todo == [] and again.stats.footer_reads == 0
    finally:
        shutil.rmtree(index, ignore_errors=True)
        shutil.copytree(saved, index)


def test_file_with_another_fingerprint_is_redone_not_trusted(done, tmp_path):
    src, dest = done
    other = tmp_path / "out"
    other.mkdir()
    # A file from a float32 run sits where a float16 run wants its output.
    for p in dest.glob("*.parquet"):
        (other / p.name).write_bytes(p.read_bytes())
    assert todo(config(src, other, **{"sink.dtype": "float32"})) == ["00000", "00001", "00002"]


def test_a_stopped_run_counts_what_its_unfinished_tasks_committed(done, tmp_path):
    """A stop mid-run: task runs in flight may have committed shards whose results never
    came back. The flow checks those shards (and only those) so the run record counts
    them; a shard with another fingerprint or no file is not counted."""
    from clipbatch_flows.embed import committed_in_flight

    src, dest = done
    cfg = config(src, dest)
    plan = plan_shards(cfg)
    shards = {s.name: s for s in plan.skipped}
    in_flight = [shards["00000"], shards["00001"], shards["00002"]]
    found = committed_in_flight(in_flight, plan.fingerprints, plan.config or cfg)
    assert [(r.shard, r.status, r.rows) for r in found] == [
        ("00000", "committed", 3),
        ("00001", "committed", 3),
        ("00002", "committed", 3),
    ]
    assert all(r.output_uri.endswith(f"{r.shard}.parquet") for r in found)
    other = tmp_path / "out"
    other.mkdir()
    (other / "00001.parquet").write_bytes((dest / "00001.parquet").read_bytes())
    stale = dict(plan.fingerprints, **{"00001": "another-fingerprint"})
    cfg_other = (plan.config or cfg).model_copy(
        update={"sink": (plan.config or cfg).sink.model_copy(update={"url": str(other)})}
    )
    found = committed_in_flight(in_flight, plan.fingerprints, cfg_other)
    assert [r.shard for r in found] == ["00001"]
    assert committed_in_flight(in_flight, stale, cfg_other) == []


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def test_clean_staging_removes_only_what_no_live_run_owns(tmp_path):
    dest = tmp_path / "out"
    sink = config(tmp_path, dest).sink
    tmp = dest / TMP_DIR
    mine = staging_id("live-run")  # this process: alive
    host = mine.split("__")[1]
    folders = {
        "live": mine,
        "dead": f"crashed__{host}__{_dead_pid()}__abcd1234",
        "remote_fresh": "other__another-host__123__abcd1234",
        "remote_old": "old__another-host__123__abcd1234",
        "legacy_old": "some-run-id",
    }
    for name in folders.values():
        (tmp / name).mkdir(parents=True)
        (tmp / name / "00000.parquet").write_bytes(b"partial")
    old = time.time() - STALE_AFTER_SECONDS - 60
    for key in ("remote_old", "legacy_old"):
        os.utime(tmp / folders[key] / "00000.parquet", (old, old))
    assert clean_staging(sink) == 3
    left = sorted(p.name for p in tmp.iterdir())
    assert left == sorted([folders["live"], folders["remote_fresh"]])


def test_local_temp_files_of_killed_processes_are_removed(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    (tmp_path / f"{LOCAL_PREFIX}{dead}-00000-x.parquet").write_bytes(b"half")
    (tmp_path / f"{LOCAL_PREFIX}{live}-00001-y.parquet").write_bytes(b"in use")
    (tmp_path / "unrelated.parquet").write_bytes(b"not ours")
    assert clean_local_temp(str(tmp_path)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{LOCAL_PREFIX}{live}-00001-y.parquet", "unrelated.parquet"]
    )
