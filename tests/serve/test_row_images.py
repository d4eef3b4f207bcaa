"""A row's image is its source image, byte for byte, at a constant cost.

For each source kind the bytes the server returns hash to the row's ``image_sha256``:
a local tar, a tar on S3 (moto; every request counted by a proxy: the first row of a
shard costs the ``_members/`` read and one ranged GET, later rows the ranged GET only,
never a scan), a ``.tar.gz`` (scanned: no random access), a folder, and a table of URLs
served on loopback (reachable only through the server's own ``allow_networks``). A table
written before ``_members/`` existed is served too, by one scan of each tar.
"""

from __future__ import annotations

import hashlib
import http.server
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbatch.config import StorageOptions
from clipbatch.serve.catalog import load_catalog
from clipbatch.synthetic import write_webdataset
from clipbatch.tables.row_images import RowImageError, RowImages, SourceChangedError
from tests.conftest import upload_dir
from tests.faultproxy import FaultProxy
from tests.serve.tables import embed, tiny_config

pytestmark = pytest.mark.timeout(300)


def served_images(dest: str, images: RowImages, storage: StorageOptions | None = None) -> int:
    """Read every row's image; check each against its hash; return how many there were."""
    catalog = load_catalog(dest, storage)
    count = 0
    for i in range(len(catalog)):
        location = catalog.location(i)
        if location.image_sha256 is None:
            continue
        data = images.read(location)
        assert hashlib.sha256(data).digest() == location.image_sha256
        count += 1
    return count


def test_a_local_tar_a_gzipped_tar_and_an_old_table(tmp_path: Path) -> None:
    wds = tmp_path / "wds"
    write_webdataset(wds, shards=2, per_shard=6, seed=1, size=32)
    embed(tiny_config(str(wds), str(tmp_path / "emb")))
    assert served_images(str(tmp_path / "emb"), RowImages()) == 12
    # A table written before _members/: one scan of each tar, then ranged reads.
    shutil.rmtree(tmp_path / "emb" / "_members")
    images = RowImages()
    assert served_images(str(tmp_path / "emb"), images) == 12
    assert images.requests == 2 * (1 + 1) + 12  # per shard: the missing sidecar, a scan
    # A .tar.gz has no random access: each image is streamed to.
    gz = tmp_path / "gz"
    gz.mkdir()
    for tar in sorted(wds.glob("*.tar")):
        with tarfile.open(tar) as src, tarfile.open(gz / f"{tar.stem}.tar.gz", "w:gz") as dst:
            for member in src:
                dst.addfile(member, src.extractfile(member))
    embed(tiny_config(str(gz), str(tmp_path / "emb-gz")))
    assert served_images(str(tmp_path / "emb-gz"), RowImages()) == 12


def test_a_folder_source(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    wds = write_webdataset(tmp_path / "wds", shards=1, per_shard=5, seed=2, size=32)
    with tarfile.open(wds[0]) as tar:
        for member in tar:
            (folder / "a").mkdir(parents=True, exist_ok=True)
            (folder / "a" / member.name).write_bytes(tar.extractfile(member).read())
    embed(tiny_config({"url": str(folder), "kind": "folder"}, str(tmp_path / "emb")))
    assert served_images(str(tmp_path / "emb"), RowImages()) == 5


def test_a_tar_on_s3_costs_a_constant_number_of_requests(
    tmp_path: Path, s3_endpoint: str, s3_bucket: str
) -> None:
    wds = tmp_path / "wds"
    write_webdataset(wds, shards=1, per_shard=40, seed=3, size=32)
    source = upload_dir(wds, s3_bucket, "wds", s3_endpoint)
    storage = {"endpoint_url": s3_endpoint}
    dest = f"s3://{s3_bucket}/emb"
    embed(tiny_config(source, dest, storage))
    proxy = FaultProxy(s3_endpoint).start()
    try:
        counted = StorageOptions(endpoint_url=proxy.url)
        catalog = load_catalog(dest, counted)
        images = RowImages(counted)
        proxy.clear_exchanges()
        first = images.read(catalog.location(0))
        assert hashlib.sha256(first).digest() == catalog.location(0).image_sha256
        exchanges = proxy.recorded()
        gets = [e for e in exchanges if e.method == "GET"]
        assert len(exchanges) <= 3, exchanges
        assert any("_members/" in e.target for e in gets)
        tar_size = (wds / "00000.tar").stat().st_size
        # The ranged GET fetched the member, not the tar.
        assert sum(e.received for e in gets if ".tar" in e.target) < tar_size / 10
        proxy.clear_exchanges()
        for i in (17, 39):
            data = images.read(catalog.location(i))
            assert hashlib.sha256(data).digest() == catalog.location(i).image_sha256
        exchanges = proxy.recorded()
        assert len(exchanges) == 2, exchanges  # one ranged GET each; _members/ is cached
    finally:
        proxy.stop()


class _Images(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        data = self.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def image_server(tmp_path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    files: dict[str, bytes] = {}
    handler = type("Handler", (_Images,), {"files": files})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files
    finally:
        server.shutdown()
        server.server_close()


def test_a_table_of_urls_goes_through_the_servers_own_network_guard(
    tmp_path: Path, image_server: tuple[str, dict[str, bytes]]
) -> None:
    base, files = image_server
    wds = write_webdataset(tmp_path / "wds", shards=1, per_shard=4, seed=4, size=32)
    urls, captions = [], []
    with tarfile.open(wds[0]) as tar:
        for member in tar:
            if member.name.endswith(".jpg"):
                files[f"/{member.name}"] = tar.extractfile(member).read()
                urls.append(f"{base}/{member.name}")
            elif member.name.endswith(".txt"):
                captions.append(tar.extractfile(member).read().decode())
    pq.write_table(pa.table({"image": urls, "caption": captions}), tmp_path / "urls.parquet")
    source = {"url": str(tmp_path / "urls.parquet"), "allow_networks": ["127.0.0.0/8"]}
    embed(tiny_config(source, str(tmp_path / "emb")))
    catalog = load_catalog(str(tmp_path / "emb"))
    location = catalog.location(0)
    # The table allowed loopback when it was written; the server's own setting decides.
    with pytest.raises(RowImageError, match="blocked"):
        RowImages().read(location)
    assert served_images(str(tmp_path / "emb"), RowImages(allow_networks=("127.0.0.0/8",))) == 4
    # Changed at the source since: an error, never another image.
    files[f"/{urls[0].rsplit('/', 1)[-1]}"] = b"other bytes"
    with pytest.raises(SourceChangedError):
        RowImages(allow_networks=("127.0.0.0/8",)).read(location)
