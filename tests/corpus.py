"""A fixture corpus of good and bad inputs, written in every source layout.

Each case is an :class:`Expect`: the exact status its row must get and, for rows that
keep an embedding, the RGB image (PNG bytes, lossless) and the caption the stock clip
reference must be computed from. The same image and caption cases are written as a
WebDataset, as an image folder and as tables, so each layout is checked on each case
that applies to it.
"""

from __future__ import annotations

import io
import json
import random
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

LONG_CAPTION = " ".join(["a very long caption about a red square"] * 20)  # > 77 tokens


@dataclass
class Expect:
    status: str
    ref_png: bytes | None = None  # the RGB image the image embedding must match
    caption: str | None = None  # the caption the text embedding must match
    truncated: bool | None = None
    size: tuple[int, int] | None = None  # (width, height) after EXIF orientation
    error_has: str | None = None  # a word the readable error must contain
    extra: dict = field(default_factory=dict)  # passthrough columns to check


@dataclass
class ImageCase:
    name: str
    ext: str
    data: bytes
    status: str
    ref_png: bytes | None = None
    size: tuple[int, int] | None = None
    error_has: str | None = None


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def picture(seed: int, w: int = 64, h: int = 48) -> Image.Image:
    """A smooth random picture (JPEG-friendly, distinct per seed)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(3, 3, 3)).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.float32)
    for c in range(3):
        img[..., c] = base[0, 0, c] * (1 - xx / w) + base[1, 1, c] * (xx / w) * (yy / h)
        img[..., c] += base[2, 2, c] * ((xx // 8 + yy // 8) % 2) * 0.3
    return Image.fromarray(img.clip(0, 255).astype(np.uint8), "RGB")


def decoded_rgb(data: bytes) -> bytes:
    """What a correct decoder yields: orientation applied, RGB, as lossless PNG."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return png(ImageOps.exif_transpose(img).convert("RGB"))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims 10^10 pixels, with a tiny body: never to be decoded."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def image_cases() -> list[ImageCase]:
    good = [encode(picture(i), "JPEG", quality=92) for i in range(3)]
    cases = [
        ImageCase(f"good_{i}", "jpg", g, "ok", decoded_rgb(g), (64, 48)) for i, g in enumerate(good)
    ]
    cases.append(ImageCase("truncated", "jpg", good[0][: len(good[0]) // 2], "decode_error"))
    cases.append(ImageCase("zero_byte", "jpg", b"", "decode_error", error_has="zero-byte"))
    text = b"this is a caption that was saved with the wrong extension\n"
    cases.append(ImageCase("text_as_jpg", "jpg", text, "decode_error", error_has="not an image"))
    # Decoders sniff the content, not the name: a PNG named .webp decodes fine.
    p = png(picture(10))
    cases.append(ImageCase("png_as_webp", "webp", p, "ok", decoded_rgb(p), (64, 48)))
    cases.append(ImageCase("bomb", "png", bomb_png(), "too_large", error_has="max_image_pixels"))
    cmyk = encode(picture(11).convert("CMYK"), "JPEG", quality=95)
    cases.append(ImageCase("cmyk", "jpg", cmyk, "ok", decoded_rgb(cmyk), (64, 48)))
    gray8 = np.asarray(picture(12).convert("L"), np.uint16)
    g16 = Image.fromarray((gray8 * 257).astype("<u2"))
    g16_bytes = png(g16)
    cases.append(
        ImageCase(
            "gray16",
            "png",
            g16_bytes,
            "ok",
            png(Image.fromarray(gray8.astype(np.uint8), "L").convert("RGB")),
            (64, 48),
        )
    )
    pal = picture(13).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal_bytes = encode(pal, "PNG", transparency=0)
    rgba = Image.open(io.BytesIO(pal_bytes)).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    cases.append(
        ImageCase(
            "palette_alpha",
            "png",
            pal_bytes,
            "ok",
            png(Image.alpha_composite(white, rgba).convert("RGB")),
            (64, 48),
        )
    )
    gray = encode(picture(14).convert("L"), "JPEG", quality=95)
    cases.append(ImageCase("grayscale", "jpg", gray, "ok", decoded_rgb(gray), (64, 48)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    rot = encode(picture(15, 64, 40), "JPEG", quality=95, exif=exif.tobytes())
    cases.append(ImageCase("exif_rotated", "jpg", rot, "ok", decoded_rgb(rot), (40, 64)))
    return cases


def caption_for(name: str) -> str:
    return f"a picture called {name.replace('_', ' ')}"


# caption cases: name -> (caption bytes or None for no caption, expected status)
CAPTION_CASES: dict[str, tuple[bytes | None, str]] = {
    "cap_missing": (None, "missing_caption"),
    "cap_empty": (b"  \n", "empty_caption"),
    "cap_long": (LONG_CAPTION.encode(), "ok"),
    "cap_latin1": ("un café crème".encode("latin-1"), "caption_decode_error"),
}


def sample_cases(seed: int = 100) -> list[tuple[str, str, bytes, bytes | None, Expect]]:
    """(key, image ext, image bytes, caption bytes, expectation) for image and caption cases."""
    out = []
    for case in image_cases():
        caption = caption_for(case.name)
        keeps_text = case.status in ("ok", "decode_error", "too_large")
        out.append(
            (
                case.name,
                case.ext,
                case.data,
                caption.encode(),
                Expect(
                    case.status,
                    case.ref_png,
                    caption if keeps_text else None,
                    False if keeps_text else None,
                    case.size,
                    case.error_has,
                ),
            )
        )
    for i, (name, (cap, status)) in enumerate(CAPTION_CASES.items()):
        img = encode(picture(seed + i), "JPEG", quality=92)
        text = LONG_CAPTION if name == "cap_long" else None
        out.append(
            (
                name,
                "jpg",
                img,
                cap,
                Expect(status, decoded_rgb(img), text, True if text else None, (64, 48)),
            )
        )
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_webdataset_corpus(root: Path) -> dict[str, Expect]:
    """00000.tar: every case plus tar-only ones; 00001.tar: damaged mid-file."""
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expect] = {}
    with tarfile.open(root / "00000.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, ext, img, cap, exp in sample_cases():
            _add(tar, f"{key}.{ext}", img)
            if cap is not None:
                _add(tar, f"{key}.txt", cap)
            expected[key] = exp
        # a caption without an image: the text is still embedded
        _add(tar, "orphan_caption.txt", b"a caption with no image")
        expected["orphan_caption"] = Expect("missing_image", caption="a caption with no image")
        # duplicate keys: the second group of the same key comes later in the tar
        dup = encode(picture(40), "JPEG", quality=92)
        _add(tar, "dup.jpg", dup)
        _add(tar, "dup.txt", b"first dup")
        expected["dup"] = Expect("ok", decoded_rgb(dup), "first dup", False, (64, 48))
        _add(tar, "between.jpg", encode(picture(41), "JPEG", quality=92))
        _add(tar, "between.txt", b"between the dups")
        expected["between"] = Expect("ok", None, "between the dups", False)
        _add(tar, "dup.jpg", encode(picture(42), "JPEG", quality=92))
        _add(tar, "dup.txt", b"second dup")
        expected["dup#dup1"] = Expect("duplicate_key", error_has="2 times")
        # members escaping the shard: recorded, never extracted
        _add(tar, "../evil.jpg", b"x")
        _add(tar, "/abs/evil2.jpg", b"x")
        expected["../evil"] = Expect("unsafe_path", error_has="escapes")
        expected["/abs/evil2"] = Expect("unsafe_path", error_has="escapes")
        # json caption field and json passthrough
        _add(tar, "with_json.jpg", encode(picture(43), "JPEG", quality=92))
        _add(tar, "with_json.txt", b"caption from txt")
        _add(tar, "with_json.json", json.dumps({"url": "http://x/y.jpg", "w": 64}).encode())
        expected["with_json"] = Expect(
            "ok",
            None,
            "caption from txt",
            False,
            extra={"json": '{"url": "http://x/y.jpg", "w": 64}'},
        )
    # between's reference image
    expected["between"].ref_png = decoded_rgb(encode(picture(41), "JPEG", quality=92))
    damaged_path = root / "00001.tar"
    offsets = []
    with tarfile.open(damaged_path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(4):
            offsets.append(tar.offset)
            img = encode(picture(60 + i), "JPEG", quality=92)
            _add(tar, f"d{i}.jpg", img)
            _add(tar, f"d{i}.txt", f"damaged shard sample {i}".encode())
            if i < 2:
                expected[f"d{i}"] = Expect(
                    "ok", decoded_rgb(img), f"damaged shard sample {i}", False, (64, 48)
                )
    raw = bytearray(damaged_path.read_bytes())
    raw[offsets[2] : offsets[2] + 512] = bytes(
        random.Random(1).randrange(1, 256) for _ in range(512)
    )
    damaged_path.write_bytes(bytes(raw))
    expected["00001/__damaged__"] = Expect("shard_damaged", error_has="invalid tar header")
    return expected


def write_folder_corpus(root: Path) -> dict[str, Expect]:
    """Nested folders of images with .txt sidecars; orphan captions; two images per stem."""
    expected: dict[str, Expect] = {}
    for n, (key, ext, img, cap, exp) in enumerate(sample_cases()):
        sub = root / ("a" if n % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{key}.{ext}").write_bytes(img)
        if cap is not None:
            (sub / f"{key}.txt").write_bytes(cap)
        rel = sub.relative_to(root).as_posix()
        expected[f"{rel}/{key}"] = exp
    (root / "a" / "orphan.txt").write_bytes(b"an orphan caption")
    expected["a/orphan"] = Expect("missing_image", caption="an orphan caption")
    first = encode(picture(70), "JPEG", quality=92)
    (root / "a" / "twice.jpg").write_bytes(first)
    (root / "a" / "twice.png").write_bytes(png(picture(71)))
    (root / "a" / "twice.txt").write_bytes(b"one stem two images")
    (root / "a" / "twice.json").write_bytes(b'{"k": 1}')
    expected["a/twice"] = Expect(
        "ok", decoded_rgb(first), "one stem two images", False, (64, 48), extra={"json": '{"k": 1}'}
    )
    expected["a/twice#dup1"] = Expect("duplicate_key", error_has="2 images")
    return expected


def write_table_corpus(root: Path, http_base: str, s3_base: str) -> dict[str, Expect]:
    """data.parquet (HF {bytes, path} structs, 3 row groups), manifest.csv, rows.jsonl.

    Images referenced by path live under ``images/``; ``s3_base`` is the URL the corpus
    will be uploaded to, so s3:// references point into it. ``http_base`` serves
    ``/good.jpg`` (200), ``/flaky.jpg`` (503 once, then 200), ``/missing.jpg`` (404) and
    ``/slow.jpg`` (never in time).
    """
    root.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Expect] = {}
    # Parquet: bytes in HF structs; every image and caption case.
    ids, images, captions, scores = [], [], [], []
    for i, (key, _ext, img, cap, exp) in enumerate(sample_cases(seed=200)):
        if key == "cap_latin1":
            continue  # a Parquet string column cannot hold non-UTF-8; the CSV covers it
        ids.append(f"pq-{key}")
        images.append({"bytes": img, "path": f"{key}.bin"})
        captions.append(None if cap is None else cap.decode())
        scores.append(float(i))
        expected[f"pq-{key}"] = Expect(
            exp.status,
            exp.ref_png,
            exp.caption,
            exp.truncated,
            exp.size,
            exp.error_has,
            extra={"score": float(i)},
        )
    # a caption-only row inside an image table: no image value at all
    ids.append("pq-no-image")
    images.append(None)
    captions.append("a row without an image")
    scores.append(-1.0)
    expected["pq-no-image"] = Expect("missing_image", caption="a row without an image")
    table = pa.table(
        {
            "id": pa.array(ids),
            "image": pa.array(images, pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
            "caption": pa.array(captions, pa.string()),
            "score": pa.array(scores, pa.float64()),
        }
    )
    pq.write_table(table, root / "data.parquet", row_group_size=6)

    # Images by reference: relative paths, s3:// URIs, http URLs.
    (root / "images").mkdir()
    good = encode(picture(80), "JPEG", quality=92)
    (root / "images" / "good.jpg").write_bytes(good)
    (root / "images" / "trunc.jpg").write_bytes(good[: len(good) // 3])
    good_ref = decoded_rgb(good)
    rows = [
        (
            "c-rel",
            "images/good.jpg",
            b"relative path",
            Expect("ok", good_ref, "relative path", False, (64, 48)),
        ),
        (
            "c-s3",
            f"{s3_base}/images/good.jpg",
            b"an s3 uri",
            Expect("ok", good_ref, "an s3 uri", False),
        ),
        (
            "c-http",
            f"{http_base}/good.jpg",
            b"an http url",
            Expect("ok", good_ref, "an http url", False),
        ),
        (
            "c-flaky",  # 503 on the first request: a retry gets it
            f"{http_base}/flaky.jpg",
            b"a flaky url",
            Expect("ok", good_ref, "a flaky url", False),
        ),
        (
            "c-local",  # a table in object storage must not read the worker's disk
            "/etc/hostname",
            b"a local file",
            Expect("unsafe_path", error_has="local file"),
        ),
        (
            "c-404",
            f"{http_base}/missing.jpg",
            b"a 404",
            Expect("not_found", None, "a 404", error_has="404"),
        ),
        (
            "c-slow",
            f"{http_base}/slow.jpg",
            b"too slow",
            # A timeout outlasting its retries is transient: a later run may fetch it again.
            Expect("fetch_transient", None, "too slow", error_has="timed out"),
        ),
        (
            "c-gone",
            "images/not-there.jpg",
            b"missing object",
            Expect("not_found", None, "missing object", error_has="no such object"),
        ),
        (
            "c-s3-gone",
            f"{s3_base}/images/nope.jpg",
            b"missing s3",
            Expect("not_found", None, "missing s3"),
        ),
        ("c-trunc", "images/trunc.jpg", b"truncated", Expect("decode_error", None, "truncated")),
        (
            "c-latin1",
            "images/good.jpg",
            "caf\xe9 cr\xe8me".encode("latin-1"),
            Expect("caption_decode_error", good_ref, None),
        ),
        ("c-empty", "images/good.jpg", b"", Expect("empty_caption", good_ref, None)),
        ("c-dup", "images/good.jpg", b"first", Expect("ok", good_ref, "first", False)),
        ("c-dup", "images/good.jpg", b"second", Expect("duplicate_key", error_has="2 times")),
        ("c-noimg", "", b"no image value", Expect("missing_image", None, "no image value")),
    ]
    buf = io.BytesIO()
    buf.write(b"id,image,caption,note\r\n")
    for n, (key, ref, cap, exp) in enumerate(rows):
        field_ = b'"' + cap.replace(b'"', b'""') + b'"'
        buf.write(key.encode() + b"," + ref.encode() + b"," + field_ + f",n{n}\r\n".encode())
        exp.extra = {"note": f"n{n}"}
        expected[key if key not in expected else f"{key}#dup1"] = exp
    buf.write(b"c-ragged,only-two-fields\r\n")
    expected[f"manifest/{len(rows)}"] = Expect("bad_row", error_has="fields")
    (root / "manifest.csv").write_bytes(buf.getvalue())

    lines = [
        json.dumps(
            {"id": "j-ok", "image": "images/good.jpg", "caption": "from jsonl", "meta": {"a": 1}}
        ),
        "{not json",
        json.dumps({"id": "j-nocap", "image": "images/good.jpg", "meta": [1, 2]}),
    ]
    (root / "rows.jsonl").write_text("\n".join(lines) + "\n")
    expected["j-ok"] = Expect("ok", good_ref, "from jsonl", False, extra={"meta": '{"a": 1}'})
    expected["rows/1"] = Expect("bad_row", error_has="not JSON")
    expected["j-nocap"] = Expect("missing_caption", good_ref, None, extra={"meta": "[1, 2]"})
    return expected
