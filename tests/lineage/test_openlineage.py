"""OpenLineage events from a run on S3 (moto), received on a loopback HTTP endpoint."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator

import boto3
import pytest
from prefect import flow

from clipbatch.config import build_config
from clipbatch.lineage.openlineage.client import Emitter
from clipbatch.lineage.openlineage.shard import ShardLineage
from clipbatch.lineage.record import read_run_record
from clipbatch.lineage.transport import transport_configured
from clipbatch.records import ShardSpec
from clipbatch.synthetic import write_webdataset
from tests.conftest import upload_dir
from tests.helpers import tiny_s3_config
from tests.olspec import Collector, openlineage_env, validate_event

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def ol_collector() -> Iterator[Collector]:
    """OPENLINEAGE_URL pointing at a local collector; OPENLINEAGE_* restored afterwards."""
    collector = Collector()
    try:
        with openlineage_env(OPENLINEAGE_URL=collector.url, OPENLINEAGE_NAMESPACE="clipbatch-test"):
            yield collector
    finally:
        collector.close()


@flow(name="backfill-parent")
def backfill_parent(config) -> dict:
    from clipbatch_flows.embed import embed_dataset

    return embed_dataset(config)


def test_run_events_validate_and_link(
    prefect_harness, ol_collector, tmp_path, s3_bucket, s3_endpoint
):
    write_webdataset(tmp_path / "laion", shards=2, per_shard=6, seed=3, size=64)
    source = upload_dir(tmp_path / "laion", s3_bucket, "laion", s3_endpoint)
    dest = f"s3://{s3_bucket}/emb"
    state = backfill_parent(tiny_s3_config(source, dest, s3_endpoint), return_state=True)
    summary = state.result()
    parent_run_id = str(state.state_details.flow_run_id)
    flow_run_id = summary["run_id"]

    events = ol_collector.events
    assert events, "no OpenLineage event reached the endpoint"
    for event in events:
        validate_event(event)
    assert all(h["Content-Type"].startswith("application/json") for h in ol_collector.headers)

    flow_events = [e for e in events if e["job"]["name"] == "embed-dataset"]
    assert [e["eventType"] for e in flow_events] == ["START", "COMPLETE"]
    for e in flow_events:
        assert e["job"]["namespace"] == "clipbatch-test"
        assert e["run"]["runId"] == flow_run_id
        parent = e["run"]["facets"]["parent"]
        assert parent["run"]["runId"] == parent_run_id
        assert parent["job"]["name"] == "backfill-parent"
        (inp,) = e["inputs"]
        assert (inp["namespace"], inp["name"]) == (f"s3://{s3_bucket}", "laion")
        assert e["outputs"][0]["namespace"] == f"s3://{s3_bucket}"
        assert e["outputs"][0]["name"] == "emb"
    done = flow_events[-1]
    clip = done["run"]["facets"]["clipbatch"]
    assert clip["model"]["name"] == "tiny" and len(clip["model"]["checkpoint_sha256"]) == 64
    out = done["outputs"][0]
    assert out["outputFacets"]["outputStatistics"]["rowCount"] == 12
    fields = {f["name"]: f["type"] for f in out["facets"]["schema"]["fields"]}
    assert {"key", "source_version", "image_sha256", "image_embedding"} <= set(fields)
    assert "64" in fields["image_embedding"]
    lineage = out["facets"]["columnLineage"]["fields"]
    assert [
        (f["namespace"], f["name"], f["field"]) for f in lineage["image_embedding"]["inputFields"]
    ] == [(f"s3://{s3_bucket}", "laion", "image")]
    assert {f["field"] for f in lineage["similarity"]["inputFields"]} == {"image", "txt"}

    # Shard tasks: one run each, START then COMPLETE, children of the flow run, reading
    # the exact object version of their tar and writing their own file.
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    shard_events = [e for e in events if e["job"]["name"] == "embed-dataset.encode-shard"]
    by_run: dict[str, list[dict]] = {}
    for e in shard_events:
        by_run.setdefault(e["run"]["runId"], []).append(e)
    assert len(by_run) == 2
    outputs = set()
    for run_events in by_run.values():
        assert [e["eventType"] for e in run_events] == ["START", "COMPLETE"]
        for e in run_events:
            parent = e["run"]["facets"]["parent"]
            assert parent["run"]["runId"] == flow_run_id
            job = parent["job"]
            assert (job["namespace"], job["name"]) == ("clipbatch-test", "embed-dataset")
        end = run_events[-1]
        (inp,) = end["inputs"]
        etag = s3.head_object(Bucket=s3_bucket, Key=inp["name"])["ETag"].strip('"')
        assert inp["namespace"] == f"s3://{s3_bucket}"
        assert inp["facets"]["version"]["datasetVersion"] == f"etag:{etag}"
        (output,) = end["outputs"]
        assert output["outputFacets"]["outputStatistics"]["rowCount"] == 6
        outputs.add(output["name"])
    assert outputs == {"emb/00000.parquet", "emb/00001.parquet"}


def _bad_tar(path) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in (("k0.jpg", b"not a jpeg"), ("k0.txt", b"a caption")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_failed_shard_sends_fail_and_the_record_says_how_far(
    prefect_harness, ol_collector, tmp_path
):
    from clipbatch_flows.embed import embed_dataset

    src = tmp_path / "src"
    write_webdataset(src, shards=1, per_shard=4, seed=1, size=64)
    _bad_tar(src / "00001.tar")
    dest = tmp_path / "out"
    config = build_config(
        {
            "source": str(src),
            "dest": str(dest),
            "model": "tiny",
            "runtime": {
                "device": "cpu",
                "batch_size": 8,
                "task_retries": 0,
                "max_error_ratio": 0.5,
            },
        }
    )
    state = embed_dataset(config, return_state=True)
    assert state.is_failed()
    flow_run_id = str(state.state_details.flow_run_id)

    events = ol_collector.events
    for event in events:
        validate_event(event)
    flow_events = [e for e in events if e["job"]["name"] == "embed-dataset"]
    assert [e["eventType"] for e in flow_events] == ["START", "FAIL"]
    message = flow_events[-1]["run"]["facets"]["errorMessage"]["message"]
    assert message.startswith("RunFailedError: 1 of 2 shard(s) failed: 00001: TooManyErrorsError")
    (inp,) = flow_events[0]["inputs"]
    assert (inp["namespace"], inp["name"]) == ("file", str(src))
    shard_fail = [e for e in events if e["eventType"] == "FAIL" and e is not flow_events[-1]]
    (fail,) = shard_fail
    assert fail["inputs"][0]["name"] == str(src / "00001.tar")
    assert "TooManyErrorsError" in fail["run"]["facets"]["errorMessage"]["message"]
    shard_states = sorted(
        e["eventType"] for e in events if e["job"]["name"].endswith("encode-shard")
    )
    assert shard_states == ["COMPLETE", "FAIL", "START", "START"]

    record = read_run_record(str(dest), flow_run_id)
    assert record["status"] == "failed" and "shard" in record["error"]
    assert record["progress"]["shards_total"] == 2
    assert record["progress"]["committed"] == 1 and record["progress"]["failed"] == 1
    statuses = {o["shard"]: o["status"] for o in record["outputs"]}
    assert statuses == {"00000": "committed", "00001": "failed"}


def test_off_unless_configured_and_file_transport_from_yaml(tmp_path, monkeypatch):
    for k in [k for k in os.environ if k.startswith("OPENLINEAGE")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert not transport_configured()
    assert not Emitter().enabled

    events_file = tmp_path / "ol" / "events.jsonl"
    events_file.parent.mkdir()
    (tmp_path / "openlineage.yml").write_text(
        f"transport:\n  type: file\n  log_file_path: {events_file}\n  append: true\n"
    )
    assert transport_configured()
    config = build_config({"source": str(tmp_path / "src"), "dest": str(tmp_path / "out")})
    shard = ShardSpec(
        uri=str(tmp_path / "src" / "00000.tar"),
        name="00000",
        kind="webdataset",
        version="size:1:mtime:2",
    )
    meta = {"flow_run_id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "flow_name": "embed-dataset"}
    lineage = ShardLineage(
        shard,
        config,
        meta,
        "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
        str(tmp_path / "out" / "00000.parquet"),
    )
    assert lineage.emitter.enabled
    lineage.start()
    lineage.fail(RuntimeError("boom"))
    lines = [json.loads(x) for x in events_file.read_text().splitlines()]
    assert [e["eventType"] for e in lines] == ["START", "FAIL"]
    for e in lines:
        validate_event(e)
        (inp,) = e["inputs"]
        assert (inp["namespace"], inp["name"]) == ("file", str(tmp_path / "src" / "00000.tar"))
        assert inp["facets"]["version"]["datasetVersion"] == "size:1:mtime:2"
        assert e["run"]["facets"]["parent"]["run"]["runId"] == meta["flow_run_id"]
    assert lines[-1]["run"]["facets"]["errorMessage"]["message"] == "RuntimeError: boom"
