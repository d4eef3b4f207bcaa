"""``clipbatch curate``: a selection and shards from the command line, and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from clipbatch_flows.cli.main import main as cli

from tests.curate.roots import night


def test_curate_reports_what_it_kept_and_dropped_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    night(tmp_path, "2026-11-01", seed=1, failures=True, shards=1)
    spec = tmp_path / "curate.yaml"
    spec.write_text(yaml.safe_dump({"name": "laion-style", "rules": {"min_similarity": -1},
                                    "output": {"url": "unused"}}))  # fmt: skip
    out = tmp_path / "curated"
    root = str(tmp_path / "emb")
    assert cli(["curate", root, "--spec", str(spec), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 file(s) decided (10 rows), 0 current; kept 8, dropped 2" in text
    assert "dropped for status: 2" in text and "dropped for similarity: 2" in text
    assert "1 new shard(s) (00000..00000)" in text
    assert sorted(p.name for p in out.iterdir()) == [
        "00000.parquet",
        "00000.tar",
        "00000_stats.json",
    ]
    assert cli(["curate", root, "--spec", str(spec), "--output", str(out)]) == 0
    assert "0 file(s) decided (0 rows), 1 current" in capsys.readouterr().out


def test_curate_errors_say_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    night(tmp_path, "2026-11-01", seed=1, shards=1)
    spec = tmp_path / "curate.yaml"
    spec.write_text(yaml.safe_dump({"name": "x", "rules": {"scores": {"aesthetic-laion-v2": {"min": 5}}},
                                    "output": {"url": str(tmp_path / "o")}}))  # fmt: skip
    assert cli(["curate", str(tmp_path / "emb"), "--spec", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "reads the score(s) aesthetic-laion-v2" in err and "clipbatch score ROOT --head" in err
    assert cli(["curate", str(tmp_path / "emb"), "--spec", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
