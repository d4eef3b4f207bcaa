"""A typo costs a line, not a screenful: configuration errors before any server or model.

Each case runs ``clipbatch run`` in a fresh interpreter, the way a user types it, and
checks: exit code 2, one line on stderr naming what is wrong and how to fix it, no
traceback and no Prefect log, and neither torch nor Prefect imported (what the check
saves: their imports and the temporary server are most of a run's start-up; the seconds
themselves are in the closing note and bench/RESULTS.md, not asserted here).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from clipbatch.plan.preflight import nvidia_driver_present
from clipbatch.synthetic import write_webdataset

PROBE = """
import json, sys
from clipbatch_flows.cli.main import main
code = main(sys.argv[1:])
heavy = sorted(m for m in ("torch", "prefect", "clip", "open_clip") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}))
"""


def clipbatch_run(*argv: str) -> tuple[dict, str]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "run", *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, proc.stderr


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src")
    write_webdataset(root, shards=1, per_shard=2, seed=0, size=32)
    return root


def assert_one_clean_line(result: dict, stderr: str, *needles: str) -> None:
    assert result["code"] == 2, (result, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("clipbatch: error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, stderr)
    assert "Traceback" not in stderr and "prefect" not in stderr.lower()
    assert result["heavy"] == [], f"imported {result['heavy']} before failing"


def test_a_source_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-folder"
    result, err = clipbatch_run("--source", str(missing), "--dest", str(tmp_path / "out"))
    assert_one_clean_line(result, err, "does not exist", str(missing), "--source")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("model", "needles"),
    [
        ("ViT-Q/99", ("ViT-Q/99", "ViT-B/32", "clipbatch models")),
        ("open_clip:NoSuchArch:notag", ("NoSuchArch", "clipbatch models")),
        ("openclip:ViT-B-32:openai", ("did you mean open_clip:",)),
    ],
)
def test_an_unknown_model(data: Path, tmp_path: Path, model: str, needles: tuple[str, ...]) -> None:
    result, err = clipbatch_run("--source", str(data), "--dest", str(tmp_path), "--model", model)
    assert_one_clean_line(result, err, *needles)


@pytest.mark.skipif(nvidia_driver_present(), reason="this machine has an NVIDIA driver")
def test_a_device_this_machine_does_not_have(data: Path, tmp_path: Path) -> None:
    result, err = clipbatch_run("--source", str(data), "--dest", str(tmp_path), "--device", "cuda")
    assert_one_clean_line(result, err, "'cuda'", "--device cpu")


def test_a_destination_bucket_that_does_not_exist(
    data: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = "s3://no-such-bucket-for-clipbatch/emb"
    result, err = clipbatch_run(
        "--source", str(data), "--dest", dest, "--endpoint-url", s3_endpoint, "--model", "tiny"
    )
    assert_one_clean_line(result, err, "no-such-bucket-for-clipbatch", "does not exist", "--dest")


def test_an_unwritable_local_destination(data: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result, err = clipbatch_run("--source", str(data), "--dest", str(blocker / "emb"))
    assert_one_clean_line(result, err, "not writable", "--dest")
