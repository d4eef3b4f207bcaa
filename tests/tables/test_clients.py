"""Issue 16: real tables and real clients.

- pyarrow's schema APIs see the lineage metadata; the footer also has the counts;
- a table's ``key`` column is the key by default;
- credentials from Prefect blocks (prefect-aws), with no AWS credentials in the
  environment, on the thread pool and on per-device worker processes, leaking nowhere;
- a deployment's flow run finds its code without ``CLIPBATCH_HOME``, and a wrong one is
  an error that names it;
- an unwritable destination is a clean error naming the path;
- image URLs cannot reach loopback, private or link-local networks unless allowed, on
  every redirect hop. Traffic goes to 127.0.0.1 and ::1 only: the guard's decisions on
  other addresses are tested as a function, never by connecting.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
import uuid
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from clipbatch_flows.cli.main import main as cli

from clipbatch.config import build_config
from clipbatch.errors import ConfigError
from clipbatch.sources.netguard import AddressPolicy
from clipbatch.synthetic import jpeg_bytes, random_spec, render, write_webdataset
from tests.paths import REPO

pytestmark = pytest.mark.timeout(240)


def tiny_local(source: dict | str, dest: Path, **runtime: object):
    src = {"url": source} if isinstance(source, str) else source
    return build_config(
        {
            "source": src,
            "sink": {"url": str(dest)},
            "model": {"name": "tiny"},
            "runtime": {"device": "cpu", "batch_size": 4, "task_retries": 0, **runtime},
        }
    )


# -- lineage in the Arrow schema ------------------------------------------------------


def test_pyarrow_schema_apis_see_the_lineage_and_the_footer_the_counts(
    prefect_harness, tmp_path: Path
) -> None:
    from clipbatch_flows.embed import embed_dataset

    write_webdataset(tmp_path / "src", shards=1, per_shard=3, seed=2, size=32)
    embed_dataset(tiny_local(str(tmp_path / "src"), tmp_path / "out"))
    path = tmp_path / "out" / "00000.parquet"
    footer = json.loads(pq.read_metadata(path).metadata[b"clipbatch"])
    for schema in (
        pq.read_schema(path),
        pq.read_table(path).schema,
        pq.ParquetFile(path).schema_arrow,
    ):
        meta = json.loads(schema.metadata[b"clipbatch"])
        for part in ("model", "preprocessing", "dtype", "fingerprint", "source", "normalized"):
            assert meta[part] == footer[part], part
        assert meta["model"]["name"] == "tiny" and len(meta["fingerprint"]) == 64
    assert footer["rows"] == 3 and footer["counts"] == {"ok": 3}  # known at close only
    import duckdb

    kv = duckdb.sql(f"select key, value from parquet_kv_metadata('{path}')").fetchall()
    assert json.loads(dict(kv)[b"clipbatch"])["counts"] == {"ok": 3}


# -- the key column -------------------------------------------------------------------


def test_a_key_column_is_the_key_by_default(tmp_path: Path) -> None:
    import random

    from clipbatch.pipeline.worker import run_plan
    from clipbatch.plan.planner import plan_shards

    rng = random.Random(1)
    images = [jpeg_bytes(render(random_spec(rng), 32, rng)) for _ in range(3)]
    pq.write_table(
        pa.table(
            {
                "key": ["cat-1", "dog-7", "owl-3"],
                "image": images,
                "caption": ["a cat", "a dog", "an owl"],
                "note": ["x", "y", "z"],
            }
        ),
        tmp_path / "with-key.parquet",
    )
    pq.write_table(
        pa.table({"image": images[:1], "caption": ["a cat"]}), tmp_path / "without.parquet"
    )
    for name, keys in (("with-key", ["cat-1", "dog-7", "owl-3"]), ("without", ["without/0"])):
        dest = tmp_path / f"out-{name}"
        cfg = tiny_local({"url": str(tmp_path / f"{name}.parquet"), "kind": "table"}, dest)
        run_plan(plan_shards(cfg), "run")
        table = pq.read_table(dest / f"{name}.parquet")
        assert table.column("key").to_pylist() == keys
        assert "source_key" not in table.column_names  # consumed, not passed through
    # An explicit key_column still wins.
    dest = tmp_path / "out-note"
    cfg = tiny_local(
        {"url": str(tmp_path / "with-key.parquet"), "kind": "table", "key_column": "note"}, dest
    )
    run_plan(plan_shards(cfg), "run")
    table = pq.read_table(dest / "with-key.parquet")
    assert table.column("key").to_pylist() == ["x", "y", "z"]
    assert table.column("source_key").to_pylist() == ["cat-1", "dog-7", "owl-3"]


# -- credentials from Prefect blocks --------------------------------------------------


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path: Path) -> Iterator[None]:
    """An environment where botocore finds no credentials at all (nor probes for them)."""
    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "empty-aws-file"
    empty.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def _secret() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex[:8]


@pytest.mark.slow
def test_credentials_from_prefect_blocks_on_threads_and_device_workers(
    prefect_harness, s3_endpoint: str, s3_bucket: str, tmp_path: Path, no_aws_credentials
) -> None:
    from clipbatch_flows.embed import embed_dataset
    from prefect_aws import AwsCredentials, MinIOCredentials
    from prefect_aws.client_parameters import AwsClientParameters

    from clipbatch.io import credentials
    from tests import prefect_readback

    # Data is put in place with moto's test keys, given explicitly; the runs get none.
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    write_webdataset(tmp_path / "src", shards=2, per_shard=3, seed=6, size=32)
    for tar in sorted((tmp_path / "src").glob("*.tar")):
        s3.upload_file(str(tar), s3_bucket, f"src/{tar.name}")
    aws_key, aws_secret, minio_secret = f"AKIA{uuid.uuid4().hex[:16].upper()}", _secret(), _secret()
    aws_name, minio_name = f"moto-{uuid.uuid4().hex[:6]}", f"minio-{uuid.uuid4().hex[:6]}"
    AwsCredentials(
        aws_access_key_id=aws_key,
        aws_secret_access_key=aws_secret,
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_endpoint),
    ).save(aws_name)
    MinIOCredentials(
        minio_root_user="minio-user",
        minio_root_password=minio_secret,
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=s3_endpoint),
    ).save(minio_name)

    def config(block: str | None, dest: str, **runtime: object):
        storage = {"credentials_block": block} if block else {"endpoint_url": s3_endpoint}
        return build_config(
            {
                "source": {"url": f"s3://{s3_bucket}/src/", "storage": storage},
                "sink": {"url": f"s3://{s3_bucket}/{dest}/", "storage": storage},
                "model": {"name": "tiny"},
                "runtime": {"device": "cpu", "batch_size": 4, "task_retries": 0, **runtime},
            }
        )

    # Without a block, this environment has no credentials: the run cannot list the source.
    with pytest.raises(Exception, match="(?i)credential"):
        embed_dataset(config(None, "no-block"))
    runs = {
        "threads": embed_dataset(config(f"aws-credentials/{aws_name}", "threads")),
        "devices": embed_dataset(
            config(f"minio-credentials/{minio_name}", "devices", devices=["cpu", "cpu"])
        ),
    }
    for where, summary in runs.items():
        assert summary["shards_committed"] == 2, where
        listing = s3.list_objects_v2(Bucket=s3_bucket, Prefix=f"{where}/")["Contents"]
        files = sorted(o["Key"].rsplit("/", 1)[-1] for o in listing if "/_" not in o["Key"])
        assert files == ["00000.parquet", "00001.parquet"], where
        rows = sum(
            pq.read_metadata(
                pa.BufferReader(s3.get_object(Bucket=s3_bucket, Key=f"{where}/{f}")["Body"].read())
            ).num_rows
            for f in files
        )
        assert rows == 6, where
    assert "AKIA" not in repr(credentials.registered())  # masked, even in a repr

    # The secrets appear in nothing the runs wrote or sent.
    written: dict[str, str] = {}
    for obj in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]:
        if obj["Key"].startswith(("threads/", "devices/")):
            body = s3.get_object(Bucket=s3_bucket, Key=obj["Key"])["Body"].read()
            written[obj["Key"]] = _readable(obj["Key"], body)
    for summary in runs.values():
        run_id = summary["run_id"]
        # The scan covers what each run wrote: its logs up to the flow's last line, its
        # events (one per committed shard and the completion), its two artifacts.
        lines = prefect_readback.logs(run_id, until="done: ")
        assert any(m.startswith("done: 2 committed") for m in lines), lines[-3:]
        written[f"logs:{run_id}"] = "\n".join(lines)
        events = prefect_readback.events(run_id, ["clipbatch."], expect=3)
        assert prefect_readback.event_names(events) == {
            "clipbatch.shard.committed": 2,
            "clipbatch.run.completed": 1,
        }
        for i, e in enumerate(events):
            written[f"event:{run_id}:{i}"] = e.model_dump_json()
        arts = prefect_readback.artifacts(run_id)
        assert sorted(a.key for a in arts) == ["clipbatch-run-progress", "clipbatch-run-summary"]
        for art in arts:
            assert art.data, art.key
            written[f"artifact:{run_id}:{art.key}"] = json.dumps(
                [art.data, art.description], default=str
            )
        from prefect import get_client

        with get_client(sync_client=True) as client:
            written[f"flow-run:{run_id}"] = client.read_flow_run(run_id).model_dump_json()
    assert any("_lineage/" in k for k in written)
    for where in runs:  # both tables' files, index and run records are in the scan
        assert {f"{where}/00000.parquet", f"{where}/00001.parquet"} <= set(written), where
        assert any(k.startswith(f"{where}/_commits/") for k in written), where
        assert f"{where}/_lineage/{runs[where]['run_id']}.json" in written, where
    for where, text in written.items():
        for secret in (aws_key, aws_secret, minio_secret):
            assert secret not in text and secret[:12] not in text, f"leaked into {where}"


def _readable(key: str, body: bytes) -> str:
    import gzip

    if key.endswith(".gz"):
        return gzip.decompress(body).decode()
    if key.endswith(".parquet"):
        table = pq.read_table(pa.BufferReader(body))
        plain = table.drop_columns(
            [f.name for f in table.schema if pa.types.is_fixed_size_list(f.type)]
        )
        return body.decode("latin-1") + json.dumps(plain.to_pylist(), default=str)
    return body.decode("latin-1")


def test_pip_keeps_a_current_s3fs_beside_prefect_aws() -> None:
    """prefect-aws pins boto3/botocore ranges: s3fs must not fall back to an old release."""
    year = int(version("s3fs").split(".")[0])
    assert year >= 2024, version("s3fs")
    assert version("prefect-aws")


# -- where a deployment's flow run starts ---------------------------------------------


def test_flow_runs_find_their_code_without_clipbatch_home(tmp_path: Path, monkeypatch) -> None:
    from clipbatch_flows.deploy_steps import CodeDirectoryError, enter_code_directory

    repo = REPO
    monkeypatch.chdir(tmp_path)  # a worker starts flow runs in a temporary folder
    monkeypatch.delenv("CLIPBATCH_HOME", raising=False)
    assert enter_code_directory() == {"directory": str(repo)}
    assert Path.cwd() == repo and (Path.cwd() / "flows" / "embed.py").is_file()
    monkeypatch.setenv("CLIPBATCH_HOME", str(tmp_path / "nowhere"))
    with pytest.raises(CodeDirectoryError, match="CLIPBATCH_HOME=.*nowhere"):
        enter_code_directory()


# -- unwritable destinations ----------------------------------------------------------


def test_an_unwritable_destination_is_a_clean_error_naming_the_path(
    prefect_harness, tmp_path: Path, capsys
) -> None:
    # Tests run as root, where chmod does not stop a write: a path under a regular file does.
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    write_webdataset(tmp_path / "src", shards=1, per_shard=2, seed=1, size=32)
    argv = ["run", "--source", str(tmp_path / "src"), "--dest", str(blocker / "emb")]
    assert cli([*argv, "--model", "tiny", "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and str(blocker) in err and "Traceback" not in err
    assert cli(["demo", "--dir", str(blocker / "demo"), "--no-progress", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and "Traceback" not in err


# -- image URLs and private networks --------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "::1",
        "169.254.169.254",  # AWS, GCP, Azure instance metadata
        "fd00:ec2::254",  # AWS instance metadata over IPv6
        "fe80::1",
        "10.1.2.3",
        "172.16.0.9",
        "192.168.1.1",
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "::ffff:169.254.169.254",  # IPv4-mapped IPv6
        "::ffff:10.0.0.1",
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    ],
)
def test_the_guard_refuses_non_public_addresses(address: str) -> None:
    assert AddressPolicy().refusal(address) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111"])
def test_the_guard_allows_public_addresses(address: str) -> None:
    assert AddressPolicy().refusal(address) is None


def test_allow_networks_opens_exactly_the_named_networks() -> None:
    policy = AddressPolicy.of(["10.20.0.0/16", "::1/128"])
    assert policy.refusal("10.20.5.6") is None and policy.refusal("::1") is None
    assert policy.refusal("10.21.0.1") is not None and policy.refusal("127.0.0.1") is not None
    assert policy.refusal("::ffff:10.20.0.7") is None  # the same host, mapped
    with pytest.raises(ConfigError, match="allow_networks entry 0 is not a network"):
        build_config({"source": {"url": "x", "allow_networks": ["not-a-net"]}, "dest": "y"})


class _Images(http.server.BaseHTTPRequestHandler):
    image = b""
    redirect_to = ""

    def do_GET(self) -> None:  # noqa: N802
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            if self.path == "/hop.jpg":
                self.send_response(302)
                self.send_header("Location", self.redirect_to)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.image)))
            self.end_headers()
            self.wfile.write(self.image)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _V6Server(http.server.ThreadingHTTPServer):
    import socket

    address_family = socket.AF_INET6


@contextlib.contextmanager
def _serve(server_cls: type, host: str, handler: type) -> Iterator[int]:
    server = server_cls((host, 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_url_tables_reach_loopback_only_when_allowed_on_every_hop(
    prefect_harness, tmp_path: Path
) -> None:
    """Loopback stands in for every refused network: blocked by default (the row keeps
    its text vector), fetched when allowed, and blocked at a redirect hop to an address
    the option does not name (127.0.0.1 allowed, the hop to ::1 not)."""
    import random

    from clipbatch_flows.embed import embed_dataset

    rng = random.Random(3)
    handler = type("Handler", (_Images,), {"image": jpeg_bytes(render(random_spec(rng), 32, rng))})
    with _serve(_V6Server, "::1", handler) as v6_port:
        handler.redirect_to = f"http://[::1]:{v6_port}/img.jpg"
        with _serve(http.server.ThreadingHTTPServer, "127.0.0.1", handler) as port:
            table = tmp_path / "urls.csv"
            table.write_text(
                "key,image,caption\n"
                f"direct,http://127.0.0.1:{port}/img.jpg,a direct url\n"
                f"hop,http://127.0.0.1:{port}/hop.jpg,a redirected url\n"
            )

            def rows(allow: list[str], name: str) -> dict[str, dict]:
                dest = tmp_path / name
                source = {"url": str(table), "kind": "table", "allow_networks": allow}
                embed_dataset(tiny_local(source, dest))
                return {r["key"]: r for r in pq.read_table(dest / "urls.parquet").to_pylist()}

            blocked = rows([], "default")
            one_hop = rows(["127.0.0.1/32"], "v4-only")
            both = rows(["127.0.0.1/32", "::1/128"], "both")
    for row in blocked.values():
        assert row["status"] == "blocked_url" and "loopback" in row["error"]
        assert "allow_networks" in row["error"]
        # No image vector: all zeros, never a null (every client reads the column).
        assert row["image_embedding"] == [0.0] * 64 and any(row["text_embedding"])
    assert one_hop["direct"]["status"] == "ok"
    assert one_hop["hop"]["status"] == "blocked_url" and "::1" in one_hop["hop"]["error"]
    assert {r["status"] for r in both.values()} == {"ok"}
    assert cli(["inspect", str(tmp_path / "default")]) == 0  # a blocked row keeps its text
