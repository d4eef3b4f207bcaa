"""The score flow on moto's S3: heads and SemDeDup over a root, as a deployment runs it.

Through a counting proxy: requests and bytes per shard file are the same at 4 and 12
files, and a rerun with nothing new costs a handful of requests, whatever the size.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from clipbatch.config import StorageOptions
from clipbatch.heads.laion import OPENAI_VIT_L14, AestheticMLP
from clipbatch.io.storage import get_fs
from tests.conftest import upload_dir
from tests.faultproxy import FaultProxy
from tests.judge.tables import unit_rows, write_vector_table

pytestmark = pytest.mark.timeout(300)
VIT_L14 = {"name": "ViT-L/14", "checkpoint_sha256": OPENAI_VIT_L14}
ROWS_PER_FILE = 50


def _table_reads(exchanges: list) -> dict[str, int]:
    """GETs of the table's own shard files (not of _scores/ or _semdedup/), per file."""
    reads: dict[str, int] = {}
    for ex in exchanges:
        path = unquote(urlsplit(ex.target).path)
        if ex.method == "GET" and "/_" not in path and path.endswith(".parquet"):
            name = path.rsplit("/", 1)[-1]
            reads[name] = reads.get(name, 0) + 1
    return reads


def test_the_flow_judges_a_root_on_s3_at_the_same_cost_per_file(
    prefect_harness, s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    from clipbatch_flows.limits import root_limit_name
    from clipbatch_flows.score import SCORE_KEY, score_flow
    from prefect import get_client

    from tests import prefect_readback

    torch.manual_seed(0)
    weights = tmp_path / "aesthetic.pth"
    torch.save(AestheticMLP().state_dict(), weights)
    head = f"aesthetic-laion-v2={weights}"
    rng = np.random.default_rng(5)
    per_file: dict[int, tuple[float, float]] = {}
    proxy = FaultProxy(s3_endpoint).start()
    try:
        for n in (4, 12):
            local = tmp_path / f"emb{n}"
            write_vector_table(
                local / "date=2026-11-01", unit_rows(rng, n * ROWS_PER_FILE, 768), VIT_L14, files=n
            )
            root = upload_dir(local, s3_bucket, f"emb{n}", s3_endpoint)
            storage = StorageOptions(endpoint_url=proxy.url)
            proxy.clear_exchanges()
            state = score_flow(root=root, heads=[head], storage=storage, return_state=True)
            head_report, dedup_report = state.result()
            assert (head_report["files_scored"], head_report["rows"]) == (n, n * ROWS_PER_FILE)
            assert (dedup_report["files_new"], dedup_report["rows_new"]) == (n, n * ROWS_PER_FILE)
            exchanges = proxy.recorded()
            reads = _table_reads(exchanges)
            # Each shard file is read a bounded number of times (its footer and two
            # columns, by the head; and by SemDeDup, to train and then to assign).
            assert len(reads) == n and max(reads.values()) <= 12, reads
            per_file[n] = (len(exchanges) / n, sum(e.sent + e.received for e in exchanges) / n)
            # Nothing new: a few requests for the whole root, however many files it has.
            proxy.clear_exchanges()
            again = score_flow(root=root, heads=[head], storage=storage)
            assert again[0]["files_scored"] == 0 and again[1]["files_new"] == 0
            exchanges = proxy.recorded()
            assert _table_reads(exchanges) == {}
            assert len(exchanges) <= 20, [e.target for e in exchanges]
        # The scores are on S3 beside the table, one file per shard file.
        fs, path = get_fs(f"{root}/date=2026-11-01/_scores/aesthetic-laion-v2", storage)
        scores = pq.read_table(path, filesystem=fs)
        assert scores.num_rows == 12 * ROWS_PER_FILE and scores.column("score").null_count == 0
    finally:
        proxy.stop()
    small, big = per_file[4], per_file[12]
    assert big[0] <= small[0] * 1.05 and big[1] <= 1.1 * small[1], per_file

    arts = {a.key: a for a in prefect_readback.artifacts(str(state.state_details.flow_run_id))}
    assert "| _scores/aesthetic-laion-v2 | 12 | 600 |" in arts[SCORE_KEY].data
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(root_limit_name(root, "judge"))
    assert (limit.limit, limit.active_slots) == (1, 0)  # one judging job per root; released


def test_the_flow_refuses_a_head_of_another_model_before_scoring(
    prefect_harness, tmp_path: Path
) -> None:
    """A ViT-L/14 head on a ViT-B/32 table: the task fails with the reason, nothing written."""
    from clipbatch_flows.score import score_flow

    torch.manual_seed(0)
    weights = tmp_path / "aesthetic.pth"
    torch.save(AestheticMLP().state_dict(), weights)
    root = tmp_path / "emb"
    rng = np.random.default_rng(1)
    write_vector_table(root, unit_rows(rng, 20, 512), {"name": "ViT-B/32"}, files=1)
    state = score_flow(
        root=str(root), heads=[f"aesthetic-laion-v2={weights}"], semdedup=False,
        return_state=True,
    )  # fmt: skip
    assert state.is_failed()
    with pytest.raises(Exception, match="ViT-B/32|512"):
        state.result()
    assert not (root / "_scores" / "aesthetic-laion-v2").exists() or not any(
        (root / "_scores" / "aesthetic-laion-v2").glob("*.parquet")
    )
