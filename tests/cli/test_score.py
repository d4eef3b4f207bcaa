"""``clipbatch score``: heads and SemDeDup from the command line, and its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from clipbatch_flows.cli.main import main as cli

from clipbatch.heads.laion import OPENAI_VIT_L14, AestheticMLP
from tests.judge.tables import unit_rows, write_vector_table

VIT_L14 = {"name": "ViT-L/14", "checkpoint_sha256": OPENAI_VIT_L14}


def test_score_writes_heads_and_groups_and_a_rerun_judges_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    weights = tmp_path / "aesthetic.pth"
    torch.save(AestheticMLP().state_dict(), weights)
    rng = np.random.default_rng(2)
    vectors = unit_rows(rng, 40, 768)
    vectors[39] = vectors[3]  # a planted duplicate
    root = tmp_path / "emb"
    write_vector_table(root / "date=2026-11-01", vectors, VIT_L14, files=2)
    args = ["score", str(root), "--head", f"aesthetic-laion-v2={weights}", "--semdedup"]
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "_scores/aesthetic-laion-v2: 2 file(s) scored (40 rows), 0 current" in out
    assert "_scores/semdedup-0.05: 2 new file(s) (40 rows), 1 ranked after" in out
    groups = pq.read_table(root / "date=2026-11-01" / "_scores" / "semdedup-0.05").to_pylist()
    by_key = {g["key"]: g for g in groups}
    assert by_key["0000039"]["group"] == by_key["0000003"]["group"]
    assert (by_key["0000003"]["rank"], by_key["0000039"]["rank"]) == (0, 1)
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "0 file(s) scored (0 rows), 2 current" in out and "0 new file(s)" in out


def test_score_lists_the_heads_it_can_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["score", "--list"]) == 0
    out = capsys.readouterr().out
    for name in ("aesthetic-laion-v2", "nsfw-laion-b32", "nsfw-laion-l14"):
        assert name in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["score"], "needs a ROOT"),
        (["score", "ROOT"], "nothing to do"),
        (["score", "ROOT", "--semdedup", "--eps", "1.5"], "between 0 and 1"),
        (["score", "ROOT", "--head", "no-such-head"], "unknown head 'no-such-head'"),
        (["score", "ROOT", "--head", "nsfw-laion-b32"], "convert it once"),
    ],
)
def test_score_errors_say_what_to_do(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(args) == 2
    assert message in capsys.readouterr().err
