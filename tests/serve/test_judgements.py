"""The server shows each row's judgements (scores, duplicate group) and filters on them.

A table written by the pipeline (tiny model) with a planted byte copy of one image,
scored by a user's head and grouped by SemDeDup as ``clipbatch score`` does.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from clipbatch.curate.run import curate_root
from clipbatch.heads.base import mlp
from clipbatch.heads.registry import load_head
from clipbatch.judge.score import score_root
from clipbatch.judge.semdedup import semdedup_root
from clipbatch.serve.app import ServerState, create_app
from clipbatch.serve.settings import ServeSettings
from tests.serve.tables import embed, tiny_config, webdataset_with_failures

pytestmark = pytest.mark.timeout(300)


def plant_copy(wds: Path) -> tuple[str, str]:
    """A byte copy of the first image under a new key, in the last shard."""
    first, *_, last = sorted(wds.glob("*.tar"))
    with tarfile.open(first) as tar:
        member = next(m for m in tar if m.name.endswith(".jpg"))
        data = tar.extractfile(member).read()
    original = member.name[: -len(".jpg")]
    with tarfile.open(last, "a") as tar:
        for name, body in (("zz-copy.jpg", data), ("zz-copy.txt", b"a planted copy")):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return original, "zz-copy"


@pytest.fixture(scope="module")
def judged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    root = tmp_path_factory.mktemp("judged")
    webdataset_with_failures(root / "wds", shards=2, per_shard=10)
    original, copy = plant_copy(root / "wds")
    embed(tiny_config(str(root / "wds"), str(root / "emb")))
    torch.manual_seed(4)
    save_file(mlp([64, 1]).state_dict(), str(root / "q.safetensors"))
    (root / "q.json").write_text(
        json.dumps(
            {"name": "quality", "embed_dim": 64, "layers": [64, 1], "weights": "q.safetensors"}
        )
    )
    score_root(str(root / "emb"), [load_head(str(root / "q.json"))])
    semdedup_root(str(root / "emb"))
    spec = {"name": "train", "rules": {"min_similarity": None, "unique": 0.05},
            "output": {"url": str(root / "curated")}}  # fmt: skip
    curate_root(str(root / "emb"), spec)
    return root / "emb", original, copy


def client_for(table: Path) -> TestClient:
    state = ServerState(ServeSettings(root=str(table)))
    return TestClient(create_app(state.settings, state))


def test_a_row_shows_its_scores_and_its_duplicate_group(judged) -> None:
    table, original, copy = judged
    with client_for(table) as client:
        info = client.get("/api/info").json()["judgements"]
        assert info["scores"]["quality"]["rows"] == 21  # every row with an image vector
        assert info["duplicates"]["semdedup-0.05"]["duplicates"] >= 1
        first = client.get(f"/api/rows/{original}").json()
        second = client.get(f"/api/rows/{copy}").json()
        assert isinstance(first["scores"]["quality"], float)
        assert first["scores"]["quality"] == pytest.approx(second["scores"]["quality"], abs=1e-3)
        group = first["duplicates"]["semdedup-0.05"]
        assert group["rank"] == 0 and second["duplicates"]["semdedup-0.05"] == {
            "group": group["group"],
            "rank": 1,
        }
        failed = client.get("/api/rows/zz-no-image").json()
        assert failed["scores"] == {"quality": None} and failed["duplicates"] == {}


def test_searches_filter_on_scores_and_on_duplicate_groups(judged) -> None:
    table, original, copy = judged
    with client_for(table) as client:
        everything = client.post("/api/search", json={"text": "a shape", "k": 50}).json()["hits"]
        values = sorted(h["scores"]["quality"] for h in everything)
        middle = values[len(values) // 2]
        high = client.post(
            "/api/search", json={"text": "a shape", "k": 50, "scores": [f"quality>={middle}"]}
        ).json()["hits"]
        assert high and all(h["scores"]["quality"] >= middle for h in high)
        assert len(high) < len(everything)
        low = client.post(
            "/api/search", json={"text": "a shape", "k": 50, "scores": [f"quality<={middle}"]}
        ).json()["hits"]
        assert {h["key"] for h in high} | {h["key"] for h in low} == {h["key"] for h in everything}
        unique = client.post(
            "/api/search", json={"key": original, "k": 50, "unique": "semdedup-0.05"}
        ).json()["hits"]
        assert copy not in {h["key"] for h in unique}  # ranked after the original
        assert copy in {
            h["key"]
            for h in client.post("/api/search", json={"key": original, "k": 50}).json()["hits"]
        }
        # The same filters on an image query (a form).
        image = client.get(f"/api/image/{original}").content
        got = client.post(
            "/api/search/image",
            files={"file": ("q.jpg", image, "image/jpeg")},
            data={"k": "50", "scores": f"quality>={middle}", "unique": "semdedup-0.05"},
        ).json()["hits"]
        assert got and all(h["scores"]["quality"] >= middle for h in got)
        assert copy not in {h["key"] for h in got}


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"scores": ["aesthetic-laion-v2>=5"]}, 400, "no score 'aesthetic-laion-v2'"),
        ({"scores": ["quality=5"]}, 422, "NAME>=VALUE"),
        ({"unique": "semdedup-0.1"}, 400, "semdedup-0.05"),
    ],
)
def test_a_filter_on_a_judgement_the_root_lacks_is_a_clear_4xx(judged, body, status, says) -> None:
    table, _, _ = judged
    with client_for(table) as client:
        r = client.post("/api/search", json={"text": "a shape", **body})
        assert r.status_code == status and says in r.text


def test_a_file_rewritten_since_it_was_judged_shows_no_stale_judgement(
    judged, tmp_path: Path
) -> None:
    import shutil

    table, original, _ = judged
    copy = tmp_path / "emb"
    shutil.copytree(table, copy)
    with client_for(copy) as client:
        row = client.get(f"/api/rows/{original}").json()
        assert row["scores"]["quality"] is not None
        rewritten = copy / row["file"]
    stat = rewritten.stat()
    os.utime(rewritten, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new version
    with client_for(copy) as client:
        row = client.get(f"/api/rows/{original}").json()
        assert row["scores"]["quality"] is None and row["duplicates"] == {}


def test_a_row_shows_why_a_curation_dropped_it(judged) -> None:
    table, original, copy = judged
    with client_for(table) as client:
        info = client.get("/api/info").json()["judgements"]["curation"]
        assert info == {"train": {"kept": 20, "dropped": 3}}  # the copy and two failed rows
        kept = client.get(f"/api/rows/{original}").json()["curation"]["train"]
        assert kept["keep"] and kept["reasons"] == [] and kept["shard"] == "00000"
        dropped = client.get(f"/api/rows/{copy}").json()["curation"]["train"]
        group = client.get(f"/api/rows/{copy}").json()["duplicates"]["semdedup-0.05"]["group"]
        assert not dropped["keep"] and dropped["reasons"] == [f"duplicate: of {group}"]
        failed = client.get("/api/rows/zz-no-image").json()["curation"]["train"]
        assert failed["reasons"] == ["status: missing_image"]
