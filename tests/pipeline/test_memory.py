"""Issue 5: memory is bounded by the pipeline's queues, not by the number of shards.

Peak RSS is measured (``ru_maxrss``) in worker processes that run 1 shard and then
20 shards of the same size through :func:`clipbatch.pipeline.worker.run_shard`. Both fork
from the same preloaded forkserver, so they start from the same baseline; the
difference is what 19 more shards cost in memory. This is a measurement, not a timing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clipbatch.config import build_config
from clipbatch.synthetic import write_webdataset
from tests.faultworker import start_worker

pytestmark = pytest.mark.timeout(300)

# Allowed growth from 1 to 20 shards. The first shard pays for allocator arenas,
# thread stacks and the model's activations; later shards must reuse them.
MAX_GROWTH_MIB = 48


def peak_rss_kib(src: Path, dest: Path, out: Path) -> int:
    cfg = build_config(
        {
            "source": str(src),
            "dest": str(dest),
            "model": "tiny",
            "runtime": {"device": "cpu", "batch_size": 8, "decode_workers": 1},
        }
    )
    code, report = start_worker(cfg, out).wait(timeout=240)
    assert code == 0 and report is not None
    return int(report["peak_rss_kib"])


@pytest.mark.slow
def test_peak_rss_does_not_grow_with_shard_count(tmp_path):
    # The same 20 shards in both datasets; the small one holds only the first.
    many = tmp_path / "many"
    one = tmp_path / "one"
    tars = write_webdataset(many, shards=20, per_shard=8, seed=11, size=48)
    one.mkdir()
    (one / tars[0].name).write_bytes(tars[0].read_bytes())

    rss_one = peak_rss_kib(one, tmp_path / "out-one", tmp_path / "one.json")
    rss_many = peak_rss_kib(many, tmp_path / "out-many", tmp_path / "many.json")
    assert len(list((tmp_path / "out-many").glob("*.parquet"))) == 20
    growth_mib = (rss_many - rss_one) / 1024
    figures = os.environ.get("CLIPBATCH_FAULT_FIGURES")
    if figures:
        with open(figures, "a") as f:
            f.write(
                json.dumps(
                    {
                        "case": "memory",
                        "peak_rss_1_shard_mib": round(rss_one / 1024, 1),
                        "peak_rss_20_shards_mib": round(rss_many / 1024, 1),
                        "growth_mib": round(growth_mib, 1),
                    }
                )
                + "\n"
            )
    assert growth_mib < MAX_GROWTH_MIB, f"peak RSS grew {growth_mib:.1f} MiB from 1 to 20 shards"
