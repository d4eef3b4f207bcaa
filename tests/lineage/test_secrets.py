"""No credential appears in anything a run writes: tables, lineage, events, artifacts, logs.

Real-looking AWS credentials sit in the environment (for the sink) and in a shared
credentials file that the config names by profile (for the source): the config
carries a reference, never the secret. An OpenLineage API key sits in the
environment too. After a run on moto, every byte the run wrote is searched, and the
search checks that it covered what the run wrote: every event, artifact and log line.

moto accepts any access key, so a run reading with the environment's keys would pass as
well: a proxy in front of the source and one in front of the sink record the access key
id of every request (tests/faultproxy.py), and every source request must carry the
profile's, every sink request the environment's.
"""

from __future__ import annotations

import gzip
import json
import logging
import secrets
import string
from collections.abc import Iterator

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbatch.config import build_config
from clipbatch.errors import ConfigError
from clipbatch.lineage.redact import MASK, Redactor, is_secret_name, redact_url
from clipbatch.synthetic import write_webdataset
from tests import prefect_readback
from tests.conftest import upload_dir
from tests.faultproxy import FaultProxy
from tests.olspec import Collector, openlineage_env

pytestmark = pytest.mark.timeout(240)


def _random(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def aws_key_pair() -> tuple[str, str]:
    """An access key id and secret in AWS's own formats."""
    key_id = "AKIA" + _random(string.ascii_uppercase + "234567", 16)
    secret = _random(string.ascii_letters + string.digits + "/+", 40)
    return key_id, secret


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def captured_logs() -> Iterator[_Capture]:
    handler = _Capture()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    # INFO, the level runs log at: botocore's own DEBUG output prints request headers
    # (access key id, session token) and is a wire-level switch users turn on knowingly.
    root.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def test_config_refuses_credentials_without_echoing_them():
    _, secret = aws_key_pair()
    for extra in ({"secret": secret}, {"client_kwargs": {"aws_secret_access_key": secret}}):
        with pytest.raises(ConfigError) as err:
            build_config(
                {"source": {"url": "s3://b/x", "storage": {"extra": extra}}, "dest": "s3://b/y"}
            )
        message = str(err.value)
        assert "look like credentials" in message
        assert secret[:8] not in message and secret[-8:] not in message


def test_redactor_masks_keys_urls_and_env_values():
    key_id, secret = aws_key_pair()
    r = Redactor(environ={"AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": key_id})
    out = r(
        {
            "error": f"auth failed for {key_id} with {secret}",
            "endpoint": f"https://{key_id}:{secret}@minio.local:9000/bucket",
            "url": "https://b.s3.amazonaws.com/k.tar?X-Amz-Signature=abc123&X-Amz-Expires=60",
            "aws_secret_access_key": "anything",
            "max_caption_tokens": 77,
            "key_column": "id",
        }
    )
    text = json.dumps(out)
    assert secret not in text and key_id not in text and "abc123" not in text
    assert out["aws_secret_access_key"] == MASK
    assert out["max_caption_tokens"] == 77 and out["key_column"] == "id"
    assert "X-Amz-Expires=60" in out["url"] and out["endpoint"].endswith("@minio.local:9000/bucket")
    assert redact_url("s3://bucket/prefix/00000.tar") == "s3://bucket/prefix/00000.tar"
    assert is_secret_name("OPENLINEAGE__TRANSPORT__AUTH") and not is_secret_name("key_column")


def test_a_block_name_is_a_reference_not_a_secret():
    """The block holds the secret; its name says which block a run used, and the index
    trigger's parameters carry it (a masked name failed the trigger's validation)."""
    _, secret = aws_key_pair()
    r = Redactor(environ={"AWS_SECRET_ACCESS_KEY": secret})
    storage = {"credentials_block": "aws-credentials/team-s3", "endpoint_url": None}
    assert r({"storage": storage}) == {"storage": storage}
    assert not is_secret_name("credentials_block")
    assert is_secret_name("credentials") and is_secret_name("aws_session_token")


def readable(key: str, body: bytes) -> str:
    """An object's text as a reader would see it: compressed parts and tables decoded."""
    if key.endswith(".gz"):
        body = gzip.decompress(body)
    elif key.endswith(".parquet"):
        table = pq.read_table(pa.BufferReader(body))
        meta = pq.read_metadata(pa.BufferReader(body)).metadata or {}
        cells = json.dumps(
            table.drop_columns(
                [f.name for f in table.schema if pa.types.is_fixed_size_list(f.type)]
            ).to_pylist(),
            default=str,
        )
        return (
            body.decode("latin-1")
            + cells
            + json.dumps({k.decode(): v.decode() for k, v in meta.items()})
        )
    return body.decode("latin-1")


def test_no_secret_anywhere_a_run_writes(
    prefect_harness, tmp_path, s3_bucket, s3_endpoint, monkeypatch, captured_logs
):
    import s3fs
    from clipbatch_flows.embed import embed_dataset

    env_key_id, env_secret = aws_key_pair()
    profile_key_id, profile_secret = aws_key_pair()
    session_token = _random(string.ascii_letters + string.digits + "/+=", 120)
    ol_api_key = _random(string.hexdigits.lower(), 40)
    secrets_all = [
        env_key_id,
        env_secret,
        profile_key_id,
        profile_secret,
        session_token,
        ol_api_key,
    ]

    creds = tmp_path / "aws-credentials"
    creds.write_text(
        "[clipbatch-test]\n"
        f"aws_access_key_id = {profile_key_id}\n"
        f"aws_secret_access_key = {profile_secret}\n"
        f"aws_session_token = {session_token}\n"
    )
    write_webdataset(tmp_path / "laion", shards=2, per_shard=4, seed=5, size=64)
    source = upload_dir(tmp_path / "laion", s3_bucket, "laion", s3_endpoint)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", env_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", env_secret)
    s3fs.S3FileSystem.clear_instance_cache()  # new clients, with these credentials

    dest = f"s3://{s3_bucket}/emb"
    # Each side reaches moto through a proxy of its own that notes who signed each request.
    source_proxy = FaultProxy(s3_endpoint).start()
    sink_proxy = FaultProxy(s3_endpoint).start()
    config = build_config(
        {
            # The config names a profile: a reference that is safe to store in parameters.
            "source": {
                "url": source,
                "storage": {"endpoint_url": source_proxy.url, "profile": "clipbatch-test"},
            },
            "sink": {"url": dest, "storage": {"endpoint_url": sink_proxy.url}},
            "model": {"name": "tiny"},
            "runtime": {"device": "cpu", "batch_size": 8, "task_retries": 0},
        }
    )
    collector = Collector()
    try:
        with openlineage_env(OPENLINEAGE_URL=collector.url, OPENLINEAGE_API_KEY=ol_api_key):
            summary = embed_dataset(config)
    finally:
        collector.close()
        source_proxy.stop()
        sink_proxy.stop()
        s3fs.S3FileSystem.clear_instance_cache()
    run_id = summary["run_id"]
    assert summary["shards_committed"] == 2
    # The secrets were really in play: the collector got the API key as a bearer token,
    # every source request was signed with the profile's key (both tars were read through
    # it), every sink request with the environment's.
    assert collector.headers and all(
        h.get("Authorization") == f"Bearer {ol_api_key}" for h in collector.headers
    )
    source_gets = {s.target.split("?")[0] for s in source_proxy.signers if s.method == "GET"}
    assert {f"/{s3_bucket}/laion/0000{i}.tar" for i in range(2)} <= source_gets, source_gets
    assert source_proxy.access_keys() == {profile_key_id: len(source_proxy.signers)}
    assert sink_proxy.access_keys() == {env_key_id: len(sink_proxy.signers)}
    assert any(s.method == "PUT" for s in sink_proxy.signers)

    written: dict[str, str] = {}
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    for obj in s3.list_objects_v2(Bucket=s3_bucket, Prefix="emb/")["Contents"]:
        body = s3.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read()
        written[f"dest:{obj['Key']}"] = readable(obj["Key"], body)
    assert any("/_lineage/" in k for k in written) and any(k.endswith(".parquet") for k in written)
    for i, body in enumerate(collector.raw):
        written[f"openlineage:{i}"] = body.decode()
    arts = prefect_readback.artifacts(run_id)
    # A run's artifacts: its progress and its summary (the index-trigger one only on error).
    assert sorted(a.key for a in arts) == ["clipbatch-run-progress", "clipbatch-run-summary"]
    for art in arts:
        assert art.data, art.key
        written[f"artifact:{art.key}"] = json.dumps([art.data, art.description], default=str)
    events = prefect_readback.events(
        run_id, ["clipbatch.", "prefect.asset.materialization"], expect=4
    )
    # Exactly what the run emits: one event per committed shard, the run's completion,
    # and the table's materialization.
    assert prefect_readback.event_names(events) == {
        "clipbatch.shard.committed": 2,
        "clipbatch.run.completed": 1,
        "prefect.asset.materialization.succeeded": 1,
    }
    for i, event in enumerate(events):
        written[f"event:{i}"] = event.model_dump_json()
    # The flow's last log line ("done: ...") proves its logs have all arrived.
    prefect_logs = prefect_readback.logs(run_id, until="done: ")
    assert any("2 committed" in line for line in prefect_logs if line.startswith("done: "))
    written["prefect-logs"] = "\n".join(prefect_logs)
    written["captured-logs"] = "\n".join(captured_logs.lines)
    assert any("done: 2 committed" in line for line in captured_logs.lines)
    from prefect import get_client

    with get_client(sync_client=True) as client:
        written["flow-run"] = client.read_flow_run(run_id).model_dump_json()
    # Every kind of thing the run wrote is in the scan: table files, index, lineage.
    assert {k for k in written if k.startswith("dest:")} >= {
        "dest:emb/00000.parquet",
        "dest:emb/00001.parquet",
        f"dest:emb/_lineage/{run_id}.json",
    }
    assert any(k.startswith("dest:emb/_commits/") for k in written)
    assert len([k for k in written if k.startswith("openlineage:")]) >= 2  # START, COMPLETE

    for where, text in written.items():
        for secret in secrets_all:
            assert secret not in text, f"a credential leaked into {where}"
            assert secret[:12] not in text, f"part of a credential leaked into {where}"
