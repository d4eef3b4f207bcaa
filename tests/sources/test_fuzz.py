"""Property tests: random bytes and captions through the readers and preprocessing never raise.

Whatever the input, each row comes out with a status from the stable set, and the
readers yield rows rather than exceptions.
"""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipbatch import records
from clipbatch.config import SourceConfig
from clipbatch.preprocess.decode import DecodeOptions, prepare
from clipbatch.records import RawSample
from clipbatch.sources.registry import get_reader
from clipbatch.sources.text import caption_from_value, decode_caption
from tests.corpus import encode, picture

pytestmark = pytest.mark.timeout(120)

STATUSES = {v for k, v in vars(records).items() if k.isupper() and isinstance(v, str)}
OPTS = DecodeOptions(n_px=32, max_pixels=1_000_000)
FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
_JPEG = encode(picture(5, 40, 30), "JPEG")
_PNG = encode(picture(6, 40, 30), "PNG")


def _mutated(seed: bytes, data: st.DataObject) -> bytes:
    """A real image with random cuts and byte flips: reaches deeper into decoders."""
    cut = data.draw(st.integers(0, len(seed)))
    out = bytearray(seed[:cut])
    for _ in range(data.draw(st.integers(0, 8))):
        if out:
            out[data.draw(st.integers(0, len(out) - 1))] = data.draw(st.integers(0, 255))
    return bytes(out)


@FUZZ
@given(st.data())
def test_prepare_never_raises(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["random", "jpeg", "png"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=2048))
    else:
        blob = _mutated(_JPEG if kind == "jpeg" else _PNG, data)
    raw = RawSample(key="k", source_member="m", image_bytes=blob, caption="c")
    out = prepare(raw, OPTS)
    assert raw.status in STATUSES
    if raw.status == "ok":
        assert out.pixels is not None and out.pixels.shape == (32, 32, 3)
    else:
        assert out.pixels is None and raw.error


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300), st.none(), st.integers()))
def test_captions_never_raise(value: object) -> None:
    text, problem = caption_from_value(value)
    if problem is None:
        assert text and text == text.strip()
        text.encode("utf-8")  # always writable to Parquet
    else:
        assert text is None and problem[0] in STATUSES
    if isinstance(value, bytes):
        assert decode_caption(value)[1] == problem


def _fuzz_tar(data: st.DataObject) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for _ in range(data.draw(st.integers(0, 4))):
            name = data.draw(st.sampled_from(["a", "b", "../c", "/d", "e/f", "a.b"]))
            ext = data.draw(st.sampled_from(["jpg", "png", "txt", "json", "webp", "x"]))
            body = data.draw(st.one_of(st.binary(max_size=200), st.just(_JPEG)))
            info = tarfile.TarInfo(f"{name}.{ext}")
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    raw = bytearray(buf.getvalue())
    if data.draw(st.booleans()) and raw:  # damage it: a cut or a flipped byte
        if data.draw(st.booleans()):
            raw = raw[: data.draw(st.integers(0, len(raw)))]
        else:
            raw[data.draw(st.integers(0, len(raw) - 1))] ^= 0xFF
    return bytes(raw)


@FUZZ
@given(st.data())
def test_webdataset_reader_never_raises(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "00000.tar"
        path.write_bytes(_fuzz_tar(data))
        reader = get_reader(SourceConfig(url=str(path), caption_json_field=None))
        (shard,) = reader.list_shards()
        for sample in reader.read(shard):
            prepare(sample, OPTS)
            assert sample.status in STATUSES and sample.key


@FUZZ
@given(st.data())
def test_table_readers_never_raise(data: st.DataObject) -> None:
    fmt = data.draw(st.sampled_from(["csv", "jsonl"]))
    cells = st.one_of(st.binary(max_size=40), st.just(b"img.jpg"), st.just(b""))
    lines = [b"image,caption,key"] if fmt == "csv" else []
    for _ in range(data.draw(st.integers(0, 6))):
        image, caption, key = (data.draw(cells) for _ in range(3))
        if fmt == "csv":
            lines.append(b",".join([image, caption, key]))
        elif data.draw(st.booleans()):
            lines.append(data.draw(st.binary(max_size=60)))  # not JSON at all
        else:
            obj = {"image": image.decode("latin-1"), "caption": caption.decode("latin-1")}
            lines.append(json.dumps(obj).encode())
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "img.jpg").write_bytes(_JPEG)
        path = Path(tmp) / f"t.{fmt}"
        path.write_bytes(b"\n".join(lines) + b"\n")
        source = SourceConfig(url=str(path), key_column="key" if fmt == "csv" else None)
        reader = get_reader(source)
        (shard,) = reader.list_shards()
        reader.passthrough_fields(shard)
        keys = []
        for sample in reader.read(shard):
            prepare(sample, OPTS)
            assert sample.status in STATUSES and sample.key
            keys.append(sample.key)
        assert len(keys) == len(set(keys))
