"""Readers without the flow: listing, slicing, detection, keys and columns, logging."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from clipbatch.config import SourceConfig
from clipbatch.errors import ConfigError
from clipbatch.skiplog import SkipLogger
from clipbatch.sources.detect import detect_kind
from clipbatch.sources.registry import get_reader
from tests.corpus import encode, picture

pytestmark = pytest.mark.timeout(60)


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _read_all(source: SourceConfig) -> dict[str, object]:
    reader = get_reader(source)
    return {s.key: s for shard in reader.list_shards() for s in reader.read(shard)}


JPG = encode(picture(1), "JPEG")


def test_detect_kind_and_ambiguity(tmp_path: Path) -> None:
    _tar(tmp_path / "w" / "00000.tar", {"a.jpg": JPG})
    pq.write_table(pa.table({"key": ["a"]}), tmp_path / "w" / "00000.parquet")  # a sidecar
    (tmp_path / "f" / "x").mkdir(parents=True)
    (tmp_path / "f" / "x" / "a.jpg").write_bytes(JPG)
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "rows.csv").write_text("image,caption\na.jpg,x\n")
    assert detect_kind(SourceConfig(url=str(tmp_path / "w"))) == "webdataset"
    assert detect_kind(SourceConfig(url=str(tmp_path / "f"))) == "folder"
    assert detect_kind(SourceConfig(url=str(tmp_path / "t"))) == "table"
    assert detect_kind(SourceConfig(url=str(tmp_path / "w" / "{00000..00000}.tar"))) == "webdataset"
    (tmp_path / "t" / "a.jpg").write_bytes(JPG)  # a table beside its images
    with pytest.raises(ConfigError, match=r"1 image\(s\), 1 table file\(s\).*--source-kind"):
        detect_kind(SourceConfig(url=str(tmp_path / "t")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="found no files.*--source-kind"):
        detect_kind(SourceConfig(url=str(tmp_path / "empty")))


def test_folder_slices_are_deterministic(tmp_path: Path) -> None:
    for i in range(7):
        sub = tmp_path / ("b" if i % 2 else "a/deep")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"img{i}.jpg").write_bytes(JPG)
        (sub / f"img{i}.txt").write_text(f"caption {i}")
    (tmp_path / "_tmp").mkdir()
    (tmp_path / "_tmp" / "junk.jpg").write_bytes(JPG)  # bookkeeping: never a row
    source = SourceConfig(url=str(tmp_path), kind="folder", folder_shard_size=3)
    first = get_reader(source).list_shards()
    assert [s.name for s in first] == ["folder-00000", "folder-00001", "folder-00002"]
    assert first == get_reader(source).list_shards()
    assert first[0].members == (
        "a/deep/img0.jpg",
        "a/deep/img0.txt",
        "a/deep/img2.jpg",
        "a/deep/img2.txt",
        "a/deep/img4.jpg",
        "a/deep/img4.txt",
    )
    rows = _read_all(source)
    assert sorted(rows) == sorted(f"{'b' if i % 2 else 'a/deep'}/img{i}" for i in range(7))
    assert rows["b/img3"].caption == "caption 3" and rows["b/img3"].image_bytes == JPG
    # Editing one caption changes only the version of the slice that holds it.
    (tmp_path / "b" / "img5.txt").write_text("a new caption, longer")
    second = get_reader(source).list_shards()
    changed = [a.name for a, b in zip(first, second, strict=True) if a.version != b.version]
    assert changed == ["folder-00002"]


def test_webdataset_custom_keys_json_caption_and_sidecar(tmp_path: Path) -> None:
    _tar(
        tmp_path / "00000.tar",
        {
            "k1.image.png": encode(picture(2), "PNG"),
            "k1.json": json.dumps({"alt": "caption in json", "w": 3}).encode(),
            "k2.image.png": encode(picture(3), "PNG"),
            "k2.json": b'{"other": 1}',
        },
    )
    pq.write_table(
        pa.table(
            {
                "key": ["k1", "k2", "k3"],
                "url": ["u1", "u2", "u3"],
                "status": ["success", "success", "failed_to_download"],
                "caption": ["x", "y", "z"],
            }
        ),
        tmp_path / "00000.parquet",
    )
    source = SourceConfig(url=str(tmp_path), image_exts=("image.png",), caption_json_field="alt")
    reader = get_reader(source)
    (shard,) = reader.list_shards()
    fields = {f.name: f.type for f in reader.passthrough_fields(shard)}
    assert fields == {"json": pa.string(), "url": pa.string(), "source_status": pa.string()}
    rows = {s.key: s for s in reader.read(shard)}
    assert rows["k1"].status == "ok" and rows["k1"].caption == "caption in json"
    assert rows["k1"].extra["url"] == "u1" and rows["k1"].extra["source_status"] == "success"
    assert rows["k2"].status == "missing_caption" and "'alt'" in rows["k2"].error
    assert rows["k3"].status == "missing_image" and rows["k3"].extra["url"] == "u3"


def test_webdataset_truncated_at_member_boundary_is_damaged(tmp_path: Path) -> None:
    path = _tar(tmp_path / "00000.tar", {"a.jpg": JPG, "a.txt": b"a", "b.jpg": JPG})
    with tarfile.open(path) as tar:
        cut = tar.getmember("b.jpg").offset
    path.write_bytes(path.read_bytes()[:cut])  # ends cleanly after a's members, no marker
    rows = _read_all(SourceConfig(url=str(path)))
    assert rows["a"].status == "ok"
    assert rows["00000/__damaged__"].status == "shard_damaged"
    assert "end-of-archive" in rows["00000/__damaged__"].error


def test_table_row_group_ranges_and_keys(tmp_path: Path) -> None:
    n = 10
    pq.write_table(
        pa.table(
            {
                "img": [{"bytes": JPG, "path": None}] * n,
                "text": [f"c{i}" for i in range(n)],
                "n": pa.array(range(n), pa.int16()),
            }
        ),
        tmp_path / "big.parquet",
        row_group_size=3,
    )
    source = SourceConfig(
        url=str(tmp_path / "big.parquet"),
        image_column="img",
        caption_column="text",
        table_shard_rows=5,
    )
    reader = get_reader(source)
    shards = reader.list_shards()
    assert [(s.name, s.row_range) for s in shards] == [
        ("big-00000", (0, 6)),
        ("big-00001", (6, 10)),
    ]
    assert [f.type for f in reader.passthrough_fields(shards[0])] == [pa.int16()]
    rows = [s for shard in shards for s in reader.read(shard)]
    assert [r.key for r in rows] == [f"big/{i}" for i in range(n)]
    assert [r.extra["n"] for r in rows] == list(range(n))
    assert all(r.image_bytes == JPG and r.status == "ok" for r in rows)
    with pytest.raises(ConfigError, match="no column 'caption'.*source.caption_column"):
        list(get_reader(SourceConfig(url=str(tmp_path), image_column="img")).read(shards[0]))


def test_csv_keeps_strings_stable(tmp_path: Path) -> None:
    # Inference would make "007" the integer 7 and give each file its own types.
    (tmp_path / "a.csv").write_bytes(b"key,image,caption,n\n007,,hello,1\n")
    rows = _read_all(SourceConfig(url=str(tmp_path / "a.csv"), key_column="key", image_column=None))
    assert rows["007"].extra == {"image": "", "n": "1"} and rows["007"].status == "ok"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_skip_logger_is_rate_limited() -> None:
    log = logging.getLogger("clipbatch.test.skips")
    handler = _Lines()
    log.addHandler(handler)
    try:
        skips = SkipLogger(log, "s0", first=3, interval_s=3600)
        for i in range(10_000):
            skips.record(f"k{i}", "decode_error" if i % 2 else "missing_caption", "bad")
        skips.summary()
    finally:
        log.removeHandler(handler)
    assert len(handler.lines) == 4  # the first 3, then one summary: never one per row
    assert "10000 rows not ok" in handler.lines[-1] and "'decode_error': 5000" in handler.lines[-1]


def test_folder_object_gone_after_listing(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / f"{name}.jpg").write_bytes(JPG)
        (tmp_path / f"{name}.txt").write_text(f"caption {name}")
    reader = get_reader(SourceConfig(url=str(tmp_path)))
    (shard,) = reader.list_shards()
    (tmp_path / "b.jpg").unlink()  # deleted between planning and reading
    rows = {s.key: s for s in reader.read(shard)}
    assert rows["a"].status == "ok"
    assert rows["b"].status == "not_found" and "no such object" in rows["b"].error
    assert rows["b"].caption == "caption b"  # the text embedding is kept
