"""A missing extra is a clear error naming the pip command.

The extra is made unimportable for real, in a fresh interpreter: a ``sitecustomize``
module on ``PYTHONPATH`` sets ``sys.modules[name] = None`` before anything runs, which is
how Python itself blocks an import (``import name`` then raises ImportError).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import REPO

pytestmark = pytest.mark.timeout(120)

REPO = REPO
PROBE = """
import sys
from clipbatch.config import ModelConfig
from clipbatch.errors import ConfigError
from clipbatch.models.loading import resolve_checkpoint
for name in sys.argv[1:]:
    try:
        resolve_checkpoint(ModelConfig(name=name))
        print(name, "=> resolved")
    except ConfigError as e:
        print(name, "=> CONFIG ERROR:", e)
"""


def run_without(modules: list[str], names: list[str], tmp_path: Path) -> dict[str, str]:
    """What resolving each name printed, in an interpreter where ``modules`` cannot import."""
    site = tmp_path / "without"
    site.mkdir()
    blocks = "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    (site / "sitecustomize.py").write_text(f"import sys\n{blocks}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]),
        "HF_HUB_OFFLINE": "1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *names],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dict(line.split(" => ", 1) for line in out.stdout.splitlines() if " => " in line)
    assert set(lines) == set(names), out.stdout + out.stderr
    return lines


def test_missing_open_clip_or_sentencepiece_names_the_pip_command(tmp_path: Path) -> None:
    from tests.model_fixtures import write_hf_siglip_dir

    siglip = f"hf:{write_hf_siglip_dir(tmp_path / 'siglip')}"
    names = ["open_clip:ViT-B-32:laion2b_s34b_b79k", "open_clip:local-dir:/nowhere", "tiny", siglip]
    results = run_without(["open_clip", "sentencepiece"], names, tmp_path)
    for name in names[:2]:
        assert "pip install 'clipbatch[open_clip]'" in results[name], results[name]
        assert "open_clip cannot be imported" in results[name]
    assert results["tiny"] == "resolved"  # OpenAI-format models need no extra
    # SigLIP's SentencePiece tokenizer: at planning, not in the first shard.
    assert "pip install 'clipbatch[hf]'" in results[siglip], results[siglip]
    assert "sentencepiece cannot be imported" in results[siglip]


def test_missing_transformers_names_the_pip_command(tmp_path: Path) -> None:
    names = ["hf:google/siglip-base-patch16-224", "hf:./some/folder"]
    results = run_without(["transformers"], names, tmp_path)
    for name in names:
        assert "pip install 'clipbatch[hf]'" in results[name], results[name]
        assert "transformers cannot be imported" in results[name]
