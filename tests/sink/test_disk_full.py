"""Disk full on the worker: local staging fills up (TMPDIR on a small tmpfs).

The shard fails with a clear error naming the path and the free space, nothing
half-written becomes visible, and a rerun with space finishes exactly. The flow runs in
this process against the session's Prefect server, so only the shard files land on the
small disk (a temporary Prefect server would need TMPDIR too).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from clipbatch.config import build_config
from clipbatch.pipeline.summary import RunFailedError
from clipbatch.synthetic import write_webdataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: too small for one shard's file. Needs root (mount)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.fixture
def tmpdir_on(monkeypatch: pytest.MonkeyPatch):
    """Point TMPDIR somewhere, as a worker's environment would (Python reads it once)."""

    def point(path: Path | None) -> None:
        if path is None:
            monkeypatch.delenv("TMPDIR", raising=False)
        else:
            monkeypatch.setenv("TMPDIR", str(path))
        tempfile.tempdir = None  # read TMPDIR again

    yield point
    tempfile.tempdir = None


def test_a_full_local_disk_is_a_clear_error_and_a_rerun_finishes(
    prefect_harness, tmp_path: Path, small_tmpfs: Path, tmpdir_on
) -> None:
    from clipbatch_flows.embed import embed_dataset

    data, dest = tmp_path / "wds", tmp_path / "emb"
    write_webdataset(data, shards=2, per_shard=400, seed=5, size=24)
    config = build_config(
        {
            "source": str(data),
            "dest": str(dest),
            "model": "tiny",
            "runtime": {"device": "cpu", "task_retries": 0},
        }
    )
    tmpdir_on(small_tmpfs)
    with pytest.raises(RunFailedError) as failed:
        embed_dataset(config)
    message = str(failed.value)
    assert "2 of 2 shard(s) failed" in message
    assert "no space left on the local disk" in message
    assert str(small_tmpfs) in message and "bytes free" in message
    # Nothing half-written is visible, nor left on the full disk.
    assert not list(dest.glob("*.parquet"))
    assert not list(dest.rglob("_tmp/**/*.parquet"))
    assert not os.listdir(small_tmpfs)
    tmpdir_on(None)
    done = embed_dataset(config)
    assert done["shards_committed"] == 2 and done["rows_written"] == 800
    assert sorted(p.name for p in dest.glob("*.parquet")) == ["00000.parquet", "00001.parquet"]
