"""Scores beside the table: incremental, bound to file versions, never half-visible."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file

from clipbatch.heads.base import HeadMismatchError, mlp
from clipbatch.heads.laion import OPENAI_VIT_L14, AestheticMLP
from clipbatch.heads.registry import load_head
from clipbatch.judge.score import score_root
from clipbatch.judge.store import SCORES_DIR
from tests.judge.tables import unit_rows, write_vector_table
from tests.paths import REPO

RNG = np.random.default_rng(3)
VIT_L14 = {"name": "ViT-L/14", "checkpoint_sha256": OPENAI_VIT_L14}


@pytest.fixture
def aesthetic(tmp_path: Path):
    torch.manual_seed(0)
    path = tmp_path / "aesthetic.pth"
    torch.save(AestheticMLP().state_dict(), path)
    return load_head(f"aesthetic-laion-v2={path}")


def scores_of(table: Path, head: str) -> dict[str, float | None]:
    rows = pq.read_table(table / SCORES_DIR / head).to_pylist()
    return {r["key"]: r["score"] for r in rows}


def test_a_root_is_scored_once_and_then_only_what_is_new(tmp_path: Path, aesthetic) -> None:
    root = tmp_path / "emb"
    vectors = unit_rows(RNG, 60, 768)
    failed = np.zeros(60, bool)
    failed[[5, 17]] = True
    write_vector_table(root / "date=2026-11-01", vectors[:40], VIT_L14, files=2, failed=failed[:40])
    first = score_root(str(root), [aesthetic]).heads[0]
    assert (first.files_scored, first.files_current, first.rows) == (2, 0, 40)
    got = scores_of(root / "date=2026-11-01", "aesthetic-laion-v2")
    expected = aesthetic.score(vectors[:40])
    for i in range(40):
        key = f"{i:07d}"
        if failed[i]:
            assert got[key] is None  # no vector: no score
        else:
            assert got[key] == pytest.approx(expected[i], abs=1e-2)  # float16 storage
    # Nothing new: nothing scored. A new night: only its files.
    assert score_root(str(root), [aesthetic]).heads[0].files_scored == 0
    write_vector_table(root / "date=2026-11-02", vectors[40:], VIT_L14, files=1, prefix="n2-")
    second = score_root(str(root), [aesthetic]).heads[0]
    assert (second.files_scored, second.files_current) == (1, 2)
    # A rewritten file (a retry commits a new version) is scored again.
    rewritten = root / "date=2026-11-01" / "00001.parquet"
    os.utime(rewritten, ns=(rewritten.stat().st_atime_ns, rewritten.stat().st_mtime_ns + 10**9))
    third = score_root(str(root), [aesthetic]).heads[0]
    assert third.files_scored == 1 and third.files_current == 2


def test_reading_scores_beside_the_table_is_a_duckdb_one_liner(tmp_path: Path, aesthetic) -> None:
    root = tmp_path / "emb"
    write_vector_table(root, unit_rows(RNG, 12, 768), VIT_L14, files=2)
    score_root(str(root), [aesthetic])
    rows = duckdb.sql(
        f"select t.key, t.caption, s.score "
        f"from read_parquet('{root}/*.parquet', filename=true) t "
        f"join read_parquet('{root}/_scores/aesthetic-laion-v2/*.parquet') s "
        f"on s.key = t.key and s.file = parse_filename(t.filename)"
    ).fetchall()
    assert len(rows) == 12 and all(r[2] is not None for r in rows)


def test_a_head_refuses_a_table_of_another_model(tmp_path: Path, aesthetic) -> None:
    root = tmp_path / "emb"
    write_vector_table(
        root,
        unit_rows(RNG, 4, 768),
        {"name": "open_clip:ViT-L-14:laion2b", "checkpoint_sha256": "a" * 64},
    )
    with pytest.raises(HeadMismatchError, match="trained on the vectors of ViT-L/14"):
        score_root(str(root), [aesthetic])
    assert not (root / SCORES_DIR).exists()


def test_a_users_head_on_a_real_table(tmp_path: Path) -> None:
    from tests.serve.tables import embed, tiny_config, webdataset_with_failures

    webdataset_with_failures(tmp_path / "wds", shards=1, per_shard=8)
    embed(tiny_config(str(tmp_path / "wds"), str(tmp_path / "emb")))
    torch.manual_seed(2)
    save_file(mlp([64, 1]).state_dict(), str(tmp_path / "q.safetensors"))
    (tmp_path / "q.json").write_text(
        json.dumps({"name": "q", "embed_dim": 64, "layers": [64, 1], "models": ["tiny"]})
    )
    report = score_root(str(tmp_path / "emb"), [load_head(str(tmp_path / "q.json"))])
    assert report.heads[0].rows == 10
    got = scores_of(tmp_path / "emb", "q")
    assert got["zz-no-image"] is None and got["zz-not-an-image"] is None
    assert sum(v is not None for v in got.values()) == 8


CRASH = """
import sys
from clipbatch.heads.registry import load_head
from clipbatch.judge.score import score_root
score_root(sys.argv[1], [load_head(sys.argv[2])])
"""


def test_a_crash_before_the_index_leaves_whole_files_and_a_rerun_completes(
    tmp_path: Path, aesthetic
) -> None:
    root = tmp_path / "emb"
    write_vector_table(root, unit_rows(RNG, 30, 768), VIT_L14, files=3)
    env = {**os.environ, "CLIPBATCH_CRASH_AT": "judge_before_index", "PYTHONPATH": str(REPO)}
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH, str(root), f"aesthetic-laion-v2={aesthetic.source}"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    folder = root / SCORES_DIR / "aesthetic-laion-v2"
    written = sorted(p.name for p in folder.iterdir())
    assert "_index.json" not in written and written  # score files, each whole
    for name in written:
        assert pq.read_table(folder / name).num_rows == 10
    again = score_root(str(root), [aesthetic]).heads[0]
    assert again.files_scored == 3  # unbound files are scored again
    assert json.loads((folder / "_index.json").read_text())["shards"].keys() == {
        "00000",
        "00001",
        "00002",
    }
