"""Issue 6: every row traces to its exact source object version; staleness is reported.

Runs the flow against S3 on moto, then reads back what it wrote: row columns, file
metadata, the run record, and what Prefect holds (artifacts, events, asset
materialisations) through the Prefect client.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import tarfile

import boto3
import pytest
from clipbatch_flows.cli.main import main as cli

from clipbatch.config import StorageOptions, build_config
from clipbatch.lineage.record import RunRecordWriter, read_run_record
from clipbatch.models.base import ResolvedCheckpoint
from clipbatch.plan.planner import RunPlan
from clipbatch.records import ShardResult, ShardSpec
from clipbatch.sink.writer import read_file_metadata
from clipbatch.synthetic import write_webdataset
from tests import prefect_readback
from tests.conftest import upload_dir
from tests.helpers import read_table, tiny_s3_config
from tests.paths import REPO

pytestmark = pytest.mark.timeout(240)


def _tar_member(s3, bucket: str, key: str, member: str) -> bytes:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        return tar.extractfile(member).read()


def test_rows_trace_to_source_versions_and_stale_sources_are_redone(
    prefect_harness, tmp_path, s3_bucket, s3_endpoint, capsys
):
    from clipbatch_flows.embed import embed_dataset

    write_webdataset(tmp_path / "laion", shards=3, per_shard=5, seed=11, size=64)
    source = upload_dir(tmp_path / "laion", s3_bucket, "laion", s3_endpoint)
    dest = f"s3://{s3_bucket}/emb"
    config = tiny_s3_config(source, dest, s3_endpoint)
    summary = embed_dataset(config)
    run_id = summary["run_id"]
    assert summary["shards_committed"] == 3

    # Row level: each row names its tar, its member and the tar's exact ETag, and its
    # image hash is the hash of that member's bytes.
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    table, files = read_table(dest, s3_endpoint)
    assert table.num_rows == 15
    etags: dict[str, str] = {}
    for row in table.to_pylist():
        key = row["source_uri"].split(f"s3://{s3_bucket}/", 1)[1]
        if key not in etags:
            etags[key] = s3.head_object(Bucket=s3_bucket, Key=key)["ETag"].strip('"')
        assert row["source_version"] == f"etag:{etags[key]}"
        image = _tar_member(s3, s3_bucket, key, f"{row['source_member']}.jpg")
        assert row["image_sha256"] == hashlib.sha256(image).digest()

    # File level: model, checkpoint, run and source version in the footer.
    storage = StorageOptions(endpoint_url=s3_endpoint)
    meta = read_file_metadata(f"{dest}/00002.parquet", storage)
    assert meta["source"]["version"] == f"etag:{etags['laion/00002.tar']}"
    assert meta["run"]["flow_run_id"] == run_id and meta["model"]["name"] == "tiny"

    # Run level: the record lists inputs with versions and outputs with counts and checksums.
    record = read_run_record(dest, run_id, storage)
    assert record["status"] == "completed" and record["ended_at"]
    assert record["prefect"]["flow_run_id"] == run_id
    assert record["prefect"]["flow_name"] == "embed-dataset"
    assert (
        record["code"]["version"]
        and record["model"]["checkpoint_sha256"] == (meta["model"]["checkpoint_sha256"])
    )
    assert record["code"]["git_commit"] == expected_commit()
    assert {i["uri"]: i["version"] for i in record["inputs"]} == {
        f"s3://{s3_bucket}/{k}": f"etag:{v}" for k, v in etags.items()
    }
    assert record["progress"] == {
        "shards_total": 3,
        "shards_done": 3,
        "committed": 3,
        "skipped": 0,
        "failed": 0,
        "rows_written": 15,
    }
    for out in record["outputs"]:
        body = s3.get_object(Bucket=s3_bucket, Key=f"emb/{out['shard']}.parquet")["Body"].read()
        assert out["sha256"] == hashlib.sha256(body).hexdigest()
        assert out["counts"] == {"ok": 5}
    assert record["parameters"]["sink"]["url"] == dest

    # Prefect: summary and progress artifacts, shard events, the asset materialisation.
    arts = {a.key: a for a in prefect_readback.artifacts(run_id)}
    summary_md = arts["clipbatch-run-summary"].data
    assert f"[{dest}]({dest})" in summary_md
    for shard in ("00000", "00001", "00002"):
        assert f"| {shard} | committed | 5 | 5 | 0 |" in summary_md
    assert arts["clipbatch-run-progress"].type == "progress"
    assert float(arts["clipbatch-run-progress"].data) == 100.0
    shard_events = prefect_readback.events(run_id, ["clipbatch.shard."], expect=3)
    assert sorted(e.payload["shard"] for e in shard_events) == ["00000", "00001", "00002"]
    assert {e.event for e in shard_events} == {"clipbatch.shard.committed"}
    for e in shard_events:
        tar_key = "laion/" + e.payload["shard"] + ".tar"
        assert e.payload["source_version"] == f"etag:{etags[tar_key]}"
    assets = prefect_readback.events(run_id, ["prefect.asset.materialization"], expect=1)
    (asset_event,) = [e for e in assets if e.resource.id == dest]
    assert asset_event.event == "prefect.asset.materialization.succeeded"
    assert asset_event.payload["rows_written"] == 15 and asset_event.payload["model"] == "tiny"
    assert any(r.id == source for r in asset_event.related)  # upstream: the source dataset

    # The CLI agrees: everything current, and one row traced by key.
    capsys.readouterr()
    assert cli(["lineage", dest, "--endpoint-url", s3_endpoint]) == 0
    assert "STALE" not in capsys.readouterr().out
    key = table.column("key")[7].as_py()
    assert cli(["lineage", dest, "--key", key, "--endpoint-url", s3_endpoint, "--json"]) == 0
    traced = json.loads(capsys.readouterr().out)
    assert traced["row"]["key"] == key and traced["stale"] == 0
    (file_info,) = traced["files"]
    assert file_info["source_version"] == traced["row"]["source_version"]
    assert file_info["model"]["checkpoint_sha256"] == meta["model"]["checkpoint_sha256"]
    assert file_info["run"]["flow_run_id"] == run_id and file_info["written_at"]

    # A source object changes: its rows are stale, and the next run redoes that shard only.
    changed = tmp_path / "changed"
    write_webdataset(changed, shards=2, per_shard=5, seed=99, size=64)
    s3.upload_file(str(changed / "00001.tar"), s3_bucket, "laion/00001.tar")
    assert cli(["lineage", dest, "--endpoint-url", s3_endpoint]) == 1
    out = capsys.readouterr().out
    assert "1 of 3 file(s) are stale" in out and "00001.tar" in out
    again = embed_dataset(config)
    assert again["shards_committed"] == 1 and again["shards_skipped"] == 2
    assert [r["shard"] for r in again["results"] if r["status"] == "committed"] == ["00001"]
    assert cli(["lineage", dest, "--endpoint-url", s3_endpoint]) == 0
    new_etag = s3.head_object(Bucket=s3_bucket, Key="laion/00001.tar")["ETag"].strip('"')
    meta = read_file_metadata(f"{dest}/00001.parquet", storage)
    assert meta["source"]["version"] == f"etag:{new_etag}" != f"etag:{etags['laion/00001.tar']}"


def checkout_head() -> str:
    """``git rev-parse HEAD`` of this checkout, the code the tests run."""
    out = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    )
    head = out.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{40}", head), head
    return head


def expected_commit() -> str:
    """What a run record must name: $CLIPBATCH_GIT_COMMIT (images) or the checkout's HEAD."""
    return os.environ.get("CLIPBATCH_GIT_COMMIT") or checkout_head()


def test_record_is_valid_json_mid_run_and_says_how_far(tmp_path, monkeypatch):
    """A run that dies after one of two shards leaves a record saying so."""
    monkeypatch.delenv("CLIPBATCH_GIT_COMMIT", raising=False)
    dest = tmp_path / "out"
    config = build_config({"source": str(tmp_path / "src"), "dest": str(dest)})
    shards = [
        ShardSpec(uri=f"/data/{n}.tar", name=n, kind="webdataset", version=f"size:1:mtime:{n}")
        for n in ("00000", "00001")
    ]
    plan = RunPlan(
        checkpoint=ResolvedCheckpoint(load_arg="x", sha256="ab" * 32, display_name="tiny"),
        shards=shards,
        fingerprints={"00000": "f0", "00001": "f1"},
        todo=list(shards),
    )
    writer = RunRecordWriter(
        config, {"flow_run_id": "run-1", "flow_name": "f"}, min_interval_s=0, part_rows=1
    )
    writer.run_started(plan)
    path = dest / "_lineage" / "run-1.json"
    first = json.loads(path.read_text())
    assert first["status"] == "running" and first["progress"]["shards_done"] == 0
    # The code version: run from this checkout, the commit is its HEAD.
    assert first["code"]["git_commit"] == checkout_head()
    assert first["inputs"] == {"count": 2, "parts": 2}  # one entry per part here
    first = read_run_record(str(dest), "run-1")
    assert [i["version"] for i in first["inputs"]] == ["size:1:mtime:00000", "size:1:mtime:00001"]
    writer.shard_finished(
        ShardResult(
            shard="00000",
            output_uri=str(dest / "00000.parquet"),
            status="committed",
            rows=4,
            counts={"ok": 3, "decode_error": 1},
            sha256="cd" * 32,
        )
    )
    mid = read_run_record(str(dest), "run-1")  # the process could die here
    assert mid["status"] == "running" and mid["ended_at"] is None
    assert mid["progress"]["shards_done"] == 1 and mid["progress"]["rows_written"] == 4
    assert mid["outputs"][0]["counts"] == {"ok": 3, "decode_error": 1}
    # No temp files left: the record, and its parts in a folder of the run's name.
    assert sorted(p.name for p in path.parent.iterdir()) == ["run-1", "run-1.json"]
    assert sorted(p.name for p in (path.parent / "run-1").iterdir()) == [
        "inputs-00000.jsonl.gz",
        "inputs-00001.jsonl.gz",
        "outputs-00000.jsonl.gz",
    ]


def test_record_names_the_image_commit_when_one_is_given(tmp_path, monkeypatch):
    """In an image there is no .git: the build passes the commit in CLIPBATCH_GIT_COMMIT."""
    monkeypatch.setenv("CLIPBATCH_GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    dest = tmp_path / "out"
    config = build_config({"source": str(tmp_path / "src"), "dest": str(dest)})
    plan = RunPlan(
        checkpoint=ResolvedCheckpoint(load_arg="x", sha256="ab" * 32, display_name="tiny"),
        shards=[],
        fingerprints={},
        todo=[],
    )
    writer = RunRecordWriter(config, {"flow_run_id": "run-2", "flow_name": "f"}, min_interval_s=0)
    writer.run_started(plan)
    record = read_run_record(str(dest), "run-2")
    assert record["code"]["git_commit"] == "0123456789abcdef0123456789abcdef01234567"
    assert record["code"]["git_commit"] != checkout_head()


def test_progress_artifact_advances_as_shards_finish(prefect_harness, tmp_path):
    """The reporter's progress artifact moves with each finished shard, not only at the end."""
    from clipbatch_flows.reporting import PrefectReporter
    from prefect import flow, get_client

    config = build_config({"source": str(tmp_path / "src"), "dest": str(tmp_path / "out")})
    shards = [
        ShardSpec(uri=f"/data/{n}.tar", name=n, kind="webdataset", version="v")
        for n in ("00000", "00001", "00002", "00003")
    ]
    plan = RunPlan(
        checkpoint=ResolvedCheckpoint(load_arg="x", sha256="ab" * 32, display_name="tiny"),
        shards=shards,
        fingerprints={s.name: "f" for s in shards},
    )
    seen: list[float] = []

    def progress(reporter: PrefectReporter) -> float:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterId

        with get_client(sync_client=True) as client:
            (art,) = client.read_artifacts(
                artifact_filter=ArtifactFilter(id=ArtifactFilterId(any_=[reporter.progress_id]))
            )
        return float(art.data)

    @flow(name="progress-probe")
    def probe() -> None:
        reporter = PrefectReporter(config, {"flow_run_id": None}, progress_interval_s=0)
        reporter.run_started(plan)
        seen.append(progress(reporter))
        for s in shards:
            reporter.shard_finished(ShardResult(shard=s.name, output_uri="", status="skipped"))
            seen.append(progress(reporter))

    probe()
    assert seen == [0.0, 25.0, 50.0, 75.0, 100.0]


def test_folder_source_staleness_without_prefect(tmp_path, capsys):
    """Folder shards hash their members: one changed image makes its shard stale."""
    import random

    from clipbatch.pipeline.worker import run_shard
    from clipbatch.plan.planner import plan_shards
    from clipbatch.synthetic import jpeg_bytes, random_spec, render

    rng = random.Random(4)
    src = tmp_path / "photos" / "a"
    src.mkdir(parents=True)
    for i in range(3):
        spec = random_spec(rng)
        (src / f"img{i}.jpg").write_bytes(jpeg_bytes(render(spec, 64, rng)))
        (src / f"img{i}.txt").write_text(spec.caption())
    dest = tmp_path / "emb"
    config = build_config(
        {
            "source": {"url": str(tmp_path / "photos"), "kind": "folder", "folder_shard_size": 2},
            "dest": str(dest),
            "model": "tiny",
            "runtime": {"device": "cpu", "batch_size": 8},
        }
    )
    plan = plan_shards(config)
    assert len(plan.todo) == 2
    for shard in plan.todo:
        run_shard(shard, config, "local-run", plan.fingerprints[shard.name])
    assert cli(["lineage", str(dest)]) == 0
    capsys.readouterr()

    (src / "img2.jpg").write_bytes(b"\xff\xd8 a different, longer image than before" * 3)
    assert cli(["lineage", str(dest), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert {f["file"].rsplit("/", 1)[-1]: f["stale"] for f in report["files"]} == {
        "folder-00000.parquet": False,
        "folder-00001.parquet": True,
    }
