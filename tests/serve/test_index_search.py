"""Search through a kNN index: the same answers as brute force, filters exact, staleness said.

A partition root of two nightly tables; an exact (Flat) index and an IVF one. With the
Flat index the hits equal brute force's; a filter is applied inside FAISS (an ID
selector), so a filtered query returns k rows that all pass, never fewer because the
filter dropped some after the search; "more like this" reconstructs the row's vector
from the index; a partition added after the build makes the index stale, and says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from clipbatch.knn.build import build_index
from clipbatch.knn.policy import IndexSettings
from clipbatch.serve.app import ServerState, create_app
from clipbatch.serve.settings import ServeSettings
from tests.serve.tables import embed, tiny_config, webdataset_with_failures

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("indexed")
    for day, seed in (("2026-11-01", 0), ("2026-11-02", 1)):
        wds = base / "src" / day
        webdataset_with_failures(wds, shards=1, per_shard=30, seed=seed)
        embed(tiny_config(str(wds), str(base / "emb" / f"date={day}")))
    return base / "emb"


def client_for(root: Path, **settings: object) -> tuple[TestClient, ServerState]:
    state = ServerState(ServeSettings(root=str(root), **settings))
    return TestClient(create_app(state.settings, state)), state


def search(client: TestClient, **body: object) -> dict:
    response = client.post("/api/search", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_an_exact_index_answers_as_brute_force_does(root: Path) -> None:
    build_index(str(root), "image", IndexSettings(factory="Flat", rebuild=True))
    indexed, _ = client_for(root)
    brute, _ = client_for(root, use_index=False)
    for query in ("a red circle", "a small green triangle"):
        a = search(indexed, text=query, k=10)
        b = search(brute, text=query, k=10)
        assert a["method"]["kind"] == "knn" and b["method"]["kind"] == "brute force"
        assert not a["method"]["stale"]
        assert [(h["table"], h["key"]) for h in a["hits"]] == [
            (h["table"], h["key"]) for h in b["hits"]
        ]
        assert np.allclose(
            [h["score"] for h in a["hits"]], [h["score"] for h in b["hits"]], atol=1e-3
        )
    assert {h["table"] for h in search(indexed, text="a circle", k=60)["hits"]} == {
        "date=2026-11-01",
        "date=2026-11-02",
    }


def test_filters_inside_the_index_return_k_rows_that_pass(root: Path) -> None:
    build_index(str(root), "image", IndexSettings(factory="IVF4,Flat", nprobe=4, rebuild=True))
    client, state = client_for(root)
    assert "IVF4,Flat" in state.search.method().detail
    got = search(client, text="a red circle", k=15, partitions=["date=2026-11-02"])
    assert got["method"]["filter"].startswith("FAISS IDSelector")
    assert len(got["hits"]) == 15 and {h["table"] for h in got["hits"]} == {"date=2026-11-02"}
    sims = sorted(h["similarity"] for h in search(client, text="x", k=60)["hits"])
    lo = sims[len(sims) // 2]
    ranged = search(client, text="a red circle", k=10, min_similarity=lo)
    assert len(ranged["hits"]) == 10 and all(h["similarity"] >= lo for h in ranged["hits"])
    # Brute force over the same filter gives the same rows.
    brute, _ = client_for(root, use_index=False)
    same = search(brute, text="a red circle", k=10, min_similarity=lo)
    assert {h["key"] for h in ranged["hits"]} == {h["key"] for h in same["hits"]}


def test_more_like_this_from_the_index_and_a_row_in_a_partition(root: Path) -> None:
    build_index(str(root), "image", IndexSettings(factory="Flat", rebuild=True))
    client, _ = client_for(root)
    first = search(client, text="a blue square", k=1)["hits"][0]
    # The same key exists in both nights (synthetic keys): the partition says which.
    ambiguous = client.post("/api/search", json={"key": first["key"], "k": 5})
    assert ambiguous.status_code == 404 and "partitions" in ambiguous.text
    got = search(client, key=first["key"], table=first["table"], k=5)
    assert got["query"]["table"] == first["table"]
    assert (first["table"], first["key"]) not in {(h["table"], h["key"]) for h in got["hits"]}
    assert got["hits"][0]["score"] > 0.5
    row = client.get(first["url"]).json()
    assert row["key"] == first["key"] and row["table"] == first["table"]


def test_a_partition_added_after_the_build_makes_the_index_stale(root: Path) -> None:
    build_index(str(root), "image", IndexSettings(factory="Flat", rebuild=True))
    wds = root.parent / "src" / "2026-11-03"
    webdataset_with_failures(wds, shards=1, per_shard=6, seed=7)
    embed(tiny_config(str(wds), str(root / "date=2026-11-03")))
    client, _ = client_for(root)
    got = search(client, text="a red circle", k=5)
    assert got["method"]["stale"] and "STALE" in got["method"]["detail"]
    info = client.get("/api/info").json()
    assert info["index"]["stale"] and "date=2026-11-03" in info["tables"]
    brute, _ = client_for(root, use_index=False)
    assert {h["table"] for h in search(brute, text="a red circle", k=200)["hits"]} >= {
        "date=2026-11-03"
    }
