"""Deferred uploads on moto's S3: invisible until completed, completed once, aborted."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from clipbatch.config import StorageOptions
from clipbatch.io import multipart
from clipbatch.io.storage import get_fs


def s3(endpoint: str):  # noqa: ANN201 - boto3's client
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def test_a_deferred_upload_is_invisible_until_completed_then_whole(
    s3_bucket: str, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(multipart, "PART_SIZE", 5 << 20)  # S3's smallest: 3 parts here
    local = tmp_path / "big.tar"
    data = bytes(range(256)) * (48 << 10)  # 12 MiB
    local.write_bytes(data)
    fs, path = get_fs(f"s3://{s3_bucket}/out/00000.tar", StorageOptions(endpoint_url=s3_endpoint))
    upload = multipart.upload_deferred(fs, path, local)
    assert [n for n, _ in upload.parts] == [1, 2, 3]
    client = s3(s3_endpoint)
    assert "Contents" not in client.list_objects_v2(Bucket=s3_bucket, Prefix="out/")
    assert multipart.pending(fs, f"{s3_bucket}/out") == [(path, upload.upload_id)]
    # The record round-trips through JSON (a commit record holds it).
    again = multipart.DeferredUpload.from_dict(upload.as_dict())
    multipart.complete(fs, path, again)
    assert client.get_object(Bucket=s3_bucket, Key="out/00000.tar")["Body"].read() == data
    assert multipart.pending(fs, f"{s3_bucket}/out") == []
    multipart.complete(fs, path, again)  # a crashed run's completion, repeated: a no-op
    assert client.get_object(Bucket=s3_bucket, Key="out/00000.tar")["Body"].read() == data


def test_an_aborted_upload_leaves_nothing_and_the_others_stay_pending(
    s3_bucket: str, s3_endpoint: str, tmp_path: Path
) -> None:
    local = tmp_path / "small.json"
    local.write_bytes(b"{}")
    fs, path = get_fs(f"s3://{s3_bucket}/o/1.json", StorageOptions(endpoint_url=s3_endpoint))
    upload = multipart.upload_deferred(fs, path, local)
    other = multipart.upload_deferred(fs, path.replace("1.json", "2.json"), local)
    multipart.abort(fs, path, upload.upload_id)
    multipart.abort(fs, path, upload.upload_id)  # gone already: fine
    assert multipart.pending(fs, f"{s3_bucket}/o") == [
        (path.replace("1.json", "2.json"), other.upload_id)
    ]
    # (Completing an aborted upload is S3's NoSuchUpload, which complete() reports as
    # gone; moto answers it with a 500, so that answer is not tested here.)
    assert "Contents" not in s3(s3_endpoint).list_objects_v2(Bucket=s3_bucket, Prefix="o/")


def test_only_s3_defers(tmp_path: Path) -> None:
    assert not multipart.supported(get_fs(str(tmp_path))[0])
    assert multipart.part_size(1 << 20) == multipart.PART_SIZE
    assert multipart.part_size(10**12) * multipart.MAX_PARTS >= 10**12
